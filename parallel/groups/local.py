"""A group of worker processes on this machine, started with ``spawn`` and supervised.

Each process builds one worker object (``"module:Class"``, constructed with the rendezvous
address, its rank and the world size) and then serves calls: the driver sends the same call to
every rank and collects one reply per rank. The driver never waits blindly: while it waits it
checks that every process is alive, and it gives up after the timeout. A group in which a call
failed or a process died is closed (its peers may be stuck in a collective) and reports
:class:`WorkerError`; the caller builds a new group to go on.
"""

from __future__ import annotations

import importlib
import itertools
import multiprocessing as mp
import os
import pickle
import queue
import sys
import time
import traceback
from multiprocessing.reduction import ForkingPickler
from typing import Any

from apb.parallel.groups import WorkerError, is_refusal
from apb.parallel.rendezvous import free_port


def _serve(worker_cls: str, kwargs: dict, rank: int, world_size: int, init_method: str,
           inbox: mp.Queue, outbox: mp.Queue) -> None:
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # all peers are local: listen on loopback only
    try:
        module, name = worker_cls.split(":")
        cls = getattr(importlib.import_module(module), name)
        worker = cls(init_method=init_method, rank=rank, world_size=world_size, **kwargs)
        outbox.put((rank, -1, True, None))
    except BaseException:
        outbox.put((rank, -1, False, traceback.format_exc()))
        return
    while True:
        seq, fn, args, kw = inbox.get()
        if fn is None:
            break
        try:
            reply = getattr(worker, fn)(*args, **kw)
        except BaseException as e:
            outbox.put((rank, seq, False, (traceback.format_exc(), is_refusal(e), str(e))))
            continue
        try:
            # pickled here: the queue would pickle it in its feeder thread, where a failure is only
            # printed, and the driver would wait out its timeout for a reply that never comes
            data = ForkingPickler.dumps(reply)
        except Exception as e:
            outbox.put((rank, seq, False, (f"the reply to {fn!r} cannot be sent to the driver: "
                                           f"{type(e).__name__}: {e}", False, None)))
            continue
        del reply
        outbox.put((rank, seq, True, bytes(data)))
    close = getattr(worker, "close", None)
    if close is not None:
        close()


class LocalWorkerGroup:
    def __init__(self, world_size: int, worker_cls: str = "apb.runtime.worker:Worker", worker_kwargs: dict | None = None,
                 timeout_s: float = 300.0, start_timeout_s: float = 180.0):
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        self.world_size = world_size
        self.timeout_s = timeout_s
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self._inboxes = [ctx.Queue() for _ in range(world_size)]
        self._outbox = ctx.Queue()
        self._seq = itertools.count()
        self.closed = False
        self.procs = [ctx.Process(target=_serve, name=f"apb-worker-{r}", daemon=True,
                                  args=(worker_cls, dict(worker_kwargs or {}), r, world_size, init_method,
                                        self._inboxes[r], self._outbox))
                      for r in range(world_size)]
        for p in self.procs:
            p.start()
        self._collect(-1, start_timeout_s, "start")

    def call(self, fn: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> list[Any]:
        """Run ``worker.fn(*args, **kwargs)`` on every rank; the replies in rank order."""
        if self.closed:
            raise WorkerError("this worker group is closed (an earlier call failed); start a new one")
        seq = next(self._seq)
        for box in self._inboxes:
            box.put((seq, fn, args, kwargs))
        return self._collect(seq, timeout_s or self.timeout_s, fn)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _collect(self, seq: int, timeout_s: float, what: str) -> list[Any]:
        replies: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < self.world_size:
            try:
                rank, got_seq, ok, payload = self._outbox.get(timeout=0.2)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(self.procs) if not p.is_alive() and r not in replies]
                if dead:
                    self.close(force=True)
                    r, code = dead[0]
                    raise WorkerError(f"worker rank {r} died (exit code {code}) during {what!r}", rank=r) from None
                if time.monotonic() > deadline:
                    self.close(force=True)
                    missing = sorted(set(range(self.world_size)) - set(replies))
                    raise WorkerError(f"no reply to {what!r} from ranks {missing} within {timeout_s:.0f}s") from None
                continue
            if got_seq != seq:
                continue  # a late reply to an earlier, abandoned call
            if not ok:
                payload, refused, reason = payload if isinstance(payload, tuple) else (payload, False, None)
                time.sleep(0.5)  # a peer's death often surfaces first as this rank's broken connection
                dead = [(r, p.exitcode) for r, p in enumerate(self.procs) if not p.is_alive()]
                self.close(force=True)
                if dead:
                    raise WorkerError(f"worker rank {dead[0][0]} died (exit code {dead[0][1]}) during {what!r}",
                                      rank=dead[0][0])
                raise WorkerError(f"worker rank {rank} failed during {what!r}:\n{payload}", rank=rank, refused=refused,
                                  reason=reason)
            replies[rank] = pickle.loads(payload) if seq >= 0 else payload
        return [replies[r] for r in range(self.world_size)]

    def close(self, force: bool = False, timeout_s: float = 10.0) -> None:
        if self.closed:
            return
        self.closed = True
        if not force:
            for box in self._inboxes:
                box.put((0, None, (), {}))
            deadline = time.monotonic() + timeout_s
            for p in self.procs:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(2.0)
            if p.is_alive():
                p.kill()

    def __enter__(self) -> "LocalWorkerGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close(force=exc[0] is not None)
