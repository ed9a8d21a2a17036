"""Workers that torchrun started: rank 0 drives, every rank computes.

Under torchrun each process builds its :class:`apb.runtime.worker.Worker` (which joins the process
group from torchrun's environment). Rank 0 runs the driver code (the same :class:`apb.Engine`
as the other launchers) with a :class:`TorchrunGroup`, which broadcasts each call over a
dedicated gloo control group; the other ranks sit in :func:`serve`, executing the same calls.
torchrun cannot replace a lost process, so a worker failure ends the job (rank 0 reports it).
"""

from __future__ import annotations

import datetime
from typing import Any

import torch.distributed as dist

from apb.parallel.groups import WorkerError, is_refusal

_STOP = "__stop__"


def control_group(timeout_s: float) -> dist.ProcessGroup:
    """A gloo group for control messages (collective: every rank calls it, in the same order)."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


class TorchrunGroup:
    """Driver side, on rank 0: ``call`` runs ``worker.fn`` on every rank; returns rank 0's reply
    first (other ranks' replies stay on their processes, as ``None``)."""

    def __init__(self, worker, ctl: dist.ProcessGroup):
        self.worker, self.ctl = worker, ctl
        self.world_size = dist.get_world_size()
        self.closed = False

    def call(self, fn: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> list[Any]:
        if self.closed:
            raise WorkerError("the torchrun worker group is closed")
        dist.broadcast_object_list([(fn, args, kwargs)], src=0, group=self.ctl)
        try:
            mine = getattr(self.worker, fn)(*args, **kwargs)
        except Exception as e:
            self.closed = True
            raise WorkerError(f"rank 0 failed during {fn!r}: {e}", rank=0, refused=is_refusal(e), reason=str(e)) from e
        return [mine] + [None] * (self.world_size - 1)

    def close(self, force: bool = False) -> None:
        if not self.closed:
            self.closed = True
            dist.broadcast_object_list([(_STOP, (), {})], src=0, group=self.ctl)


def serve(worker, ctl: dist.ProcessGroup) -> None:
    """Non-zero ranks: run the calls rank 0 broadcasts until it says stop."""
    while True:
        msg = [None]
        dist.broadcast_object_list(msg, src=0, group=ctl)
        fn, args, kwargs = msg[0]
        if fn == _STOP:
            return
        getattr(worker, fn)(*args, **kwargs)
