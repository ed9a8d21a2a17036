"""Worker groups: W workers behind one interface, whatever started them.

=========  ==========================  ===============================================
launcher   class                       who makes the processes
=========  ==========================  ===============================================
local      ``LocalWorkerGroup``        this driver spawns W processes on this machine
ray        ``RayWorkerGroup``          W Ray actors in one placement group
torchrun   ``TorchrunGroup``           torchrun; rank 0 drives, the others serve
=========  ==========================  ===============================================

Every group runs the same worker class (``apb.runtime.worker:Worker``) on each rank and
satisfies :class:`WorkerGroup`. The driver picks one by name through :data:`LAUNCHERS`;
torchrun is not in the table because torchrun itself creates the processes
(``apb.cli.torchrun_main`` builds its group).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable


class WorkerError(RuntimeError):
    """A worker raised, died, or did not answer in time.

    ``refused`` marks a deliberate refusal: the worker raised a ``ValueError`` (how the runtime
    refuses a model, a size or an option it cannot run), which would be raised again on any group,
    so the driver does not retry it. The group is closed all the same: other ranks may be waiting
    in a collective the refusing rank never joined. ``reason`` is a refusal's own message, without
    the worker's traceback (which the message keeps).
    """

    def __init__(self, message: str, rank: int | None = None, refused: bool = False, reason: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.refused = refused
        self.reason = reason if reason is not None else message


def is_refusal(exc: BaseException | None) -> bool:
    """Whether a worker's exception is a deliberate refusal (see :class:`WorkerError`)."""
    return isinstance(exc, ValueError)


@runtime_checkable
class WorkerGroup(Protocol):
    """What the driver needs from a group of W workers.

    ``call(fn, *args)`` runs ``worker.fn(*args)`` on every rank and returns one reply per rank
    in rank order (a group may return ``None`` for ranks whose replies stay remote). Any failure
    (a worker raised, died or timed out) raises :class:`WorkerError`, after which the group is
    closed and a new one must be built. ``close(force=True)`` does not wait for busy workers.
    """

    world_size: int
    closed: bool

    def call(self, fn: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> list[Any]: ...

    def close(self, force: bool = False) -> None: ...


#: launcher name -> "module:Class", imported on use so that Ray stays optional until asked for
LAUNCHERS: dict[str, str] = {
    "local": "apb.parallel.groups.local:LocalWorkerGroup",
    "ray": "apb.parallel.groups.ray:RayWorkerGroup",
}


def start_group(launcher: str, world_size: int, worker_kwargs: dict, timeout_s: float,
                ray_config: Any = None) -> WorkerGroup:
    """Start the group ``launcher`` names; ``worker_kwargs`` go to every rank's worker."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"parallel.launcher={launcher!r} cannot be started from the driver; "
                         f"startable launchers: {', '.join(LAUNCHERS)} (torchrun creates its own processes: "
                         "use launch/torchrun.sh or `apb run --launcher torchrun`)")
    module, name = LAUNCHERS[launcher].split(":")
    cls = getattr(importlib.import_module(module), name)
    extra = {"ray_cfg": ray_config} if launcher == "ray" else {}
    return cls(world_size, worker_kwargs=dict(worker_kwargs), timeout_s=timeout_s, **extra)
