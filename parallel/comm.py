"""Every byte that crosses hosts goes through :class:`Comm`, which also counts it.

A ``Comm`` wraps one process group (passed in, never the hidden world group) and offers the few
collectives the methods need: fixed- and variable-length all-gather, variable-length gather to
one rank, broadcast, an all-to-all record for libraries that do their own exchange, and a ring
(:class:`RingComm`, ``send_recv / commit / wait``) so the overlap of communication and compute
is visible in the caller's loop.

:class:`CommStats` records calls, bytes and seconds per (:class:`Phase`, layer, op) on this rank,
plus compute seconds, so verification and benchmarks can assert the communication pattern of a
method and split wall time into compute and communication.
"""

from __future__ import annotations

import contextlib
import enum
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.distributed as dist


class Phase(str, enum.Enum):
    """What the runtime is doing while it communicates: the first key of every :class:`CommStats` record.

    A ``str`` enum, so a phase equals its plain string and stats keep the same JSON keys.
    """

    CONTEXT = "context"  #: the context pass of prefill (every method)
    QUERY = "query"  #: the exact second pass of the query over every host's cache (star, apb)
    LOGITS = "logits"  #: the host holding the last prompt token broadcasts its logits (other methods)
    GATHER = "gather"  #: the KV cache moves to the decode host (decode mode gather, or verification)
    DECODE = "decode"  #: distributed decoding steps

    @property
    def is_prefill(self) -> bool:
        """Whether this phase's traffic counts as prefill (``bench`` and ``verify`` both use this).

        ``logits`` counts: exact methods broadcast the last-token logits from the host holding
        that token to every host, which is part of producing the first token, i.e. of prefill
        (star and apb do the same job in their ``query`` phase).
        """
        return self in (Phase.CONTEXT, Phase.QUERY, Phase.LOGITS)


@dataclass
class OpRecord:
    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0


#: the ``layer_cpu`` key of a prefill's work outside the model's forwards
OUTSIDE = -2


@dataclass
class CommStats:
    """Per-rank counters. ``layer`` and ``phase`` are set by the runtime as the model runs."""

    layer: int | None = None
    phase: Phase = Phase.CONTEXT
    ops: dict[tuple[Phase, int | None, str], OpRecord] = field(default_factory=lambda: defaultdict(OpRecord))
    compute_seconds: float = 0.0
    #: compute seconds per (phase, layer): from one layer's attention to the next one's; layer
    #: ``-1`` is the forward before the first attention (embedding, layer 0's projections), the
    #: last layer runs to the end of the forward (final norm, logits), and layer ``OUTSIDE`` is
    #: the prefill's work outside the forwards (checks, layout, stacking the cache)
    layer_cpu: dict[tuple[Phase, int], float] = field(default_factory=lambda: defaultdict(float))
    #: waits for the device (``torch.cuda.synchronize``) before a clock is read: CUDA kernels run
    #: asynchronously, so without it a clock measures their launch. Set for benchmarks only: each
    #: sync stalls the pipeline, so ordinary runs leave it None and their per-op seconds are
    #: launch times on CUDA (bytes and calls are exact either way)
    sync: Callable[[], None] | None = None
    #: with a list: every layer's span and every communication call, as timeline events
    #: (``name, cat, phase, layer, start`` in seconds since the epoch, comparable across local
    #: processes, ``dur`` in seconds); None: nothing recorded
    trace: list[dict] | None = None
    _mark: tuple | None = None

    def now(self) -> float:
        """Wall clock for communication timings, after the device has caught up (see ``sync``)."""
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    def compute_clock(self) -> float:
        """The per-layer clock: this process's CPU time on a CPU host (time spent waiting for a
        core is not its work), the synced wall clock on a device."""
        if self.sync is not None:
            self.sync()
            return time.perf_counter()
        return time.process_time()

    def tick(self, layer: int | None) -> None:
        """Close the running layer's clock and start ``layer``'s (None: stop)."""
        now = self.compute_clock()
        wall = time.time()
        if self._mark is not None:
            phase, prev, t, w0 = self._mark
            self.layer_cpu[(phase, prev)] += now - t
            if self.trace is not None:
                self.trace.append({"name": "embed" if prev < 0 else f"layer {prev}", "cat": "compute",
                                   "phase": Phase(phase).value, "layer": prev, "start": w0, "dur": wall - w0,
                                   "cpu_s": now - t})
        self._mark = None if layer is None else (self.phase, layer, now, wall)

    def record(self, op: str, nbytes: int, seconds: float = 0.0) -> None:
        rec = self.ops[(self.phase, self.layer, op)]
        rec.calls += 1
        rec.bytes += int(nbytes)
        rec.seconds += seconds
        if self.trace is not None:  # recorded when the call ends, so it started ``seconds`` before
            self.trace.append({"name": op, "cat": "comm", "phase": Phase(self.phase).value, "layer": self.layer,
                               "start": time.time() - seconds, "dur": seconds, "bytes": int(nbytes)})

    def calls(self, op: str | None = None, phase: Phase | None = None, layer: int | None = None) -> int:
        return sum(r.calls for k, r in self._select(op, phase, layer))

    def comm_seconds(self) -> float:
        return sum(r.seconds for r in self.ops.values())

    def _select(self, op, phase, layer):
        return [(k, r) for k, r in self.ops.items()
                if (op is None or k[2] == op) and (phase is None or k[0] == phase)
                and (layer is None or k[1] == layer)]

    def to_dict(self) -> dict:
        """Plain data (phases as their strings), for pickling to the driver and JSON."""
        return {
            "compute_s": self.compute_seconds,
            "comm_s": self.comm_seconds(),
            "ops": [{"phase": Phase(p).value, "layer": l, "op": o, "calls": r.calls, "bytes": r.bytes,
                     "seconds": r.seconds}
                    for (p, l, o), r in sorted(self.ops.items(), key=lambda kv: (kv[0][0], kv[0][1] or -1, kv[0][2]))],
            "layer_cpu": [{"phase": Phase(p).value, "layer": l, "cpu_s": v}
                          for (p, l), v in sorted(self.layer_cpu.items())],
            **({} if self.trace is None else {"trace": list(self.trace)}),
        }


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


#: set to 1 to stage every message through host memory even where the backend would not need it
#: (tests run the staged paths of ranks sharing a GPU this way on CPU)
STAGE_ENV = "APB_COMM_STAGE"


class Comm:
    """Collectives over one process group, counted in ``stats``. Ranks are ranks *in the group*.

    gloo moves only host memory (it has no CUDA send, receive, all-gather or all-to-all), and a
    group runs over gloo on GPUs only where ranks share one (NCCL refuses two ranks on a device:
    ``parallel.share_gpus``). There every message is *staged*: what is sent is copied to the host
    first, and what is received lands in a host buffer and is copied to the tensor's device after
    the wait. Slow, and meant for checks on a one-GPU machine, not for speed.
    """

    def __init__(self, group: dist.ProcessGroup | None, stats: CommStats | None = None):
        self.group = group
        self.stats = stats if stats is not None else CommStats()
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self._gloo = group is not None and dist.get_backend(group) == "gloo"
        self._always_stage = os.environ.get(STAGE_ENV) == "1"

    def staged(self, device: torch.device) -> bool:
        """Whether messages of tensors on ``device`` go through host copies."""
        return self._always_stage or (self._gloo and device.type != "cpu")

    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        """What is handed to the backend for ``t``: itself, or a host copy where staged."""
        t = t.contiguous()
        return t.to("cpu", copy=True) if self.staged(t.device) else t

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank) if self.group is not None else group_rank

    @contextlib.contextmanager
    def _timed(self, op: str, nbytes: int) -> Iterator[None]:
        t0 = self.stats.now()
        yield
        self.stats.record(op, nbytes, self.stats.now() - t0)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Same-shape tensors from every rank, in rank order."""
        t = t.contiguous()
        if self.size == 1:
            return [t]
        wire = self._wire(t)
        out = [torch.empty_like(wire) for _ in range(self.size)]
        with self._timed("all_gather", _nbytes(t)):
            dist.all_gather(out, wire, group=self.group)
        return [o.to(t.device) for o in out] if wire is not t else out

    def all_gather_start(self, t: torch.Tensor, op: str = "all_gather") -> "Pending":
        """Start an all-gather of same-shape tensors; ``.wait()`` returns them in rank order.

        Counted as one ``op`` call when waited on; the seconds are those spent waiting, so
        communication hidden behind compute does not count as communication time.
        """
        t = t.contiguous()
        if self.size == 1:
            return Pending(self, op, _nbytes(t), None, [t])
        wire = self._wire(t)
        out = [torch.empty_like(wire) for _ in range(self.size)]
        work = dist.all_gather(out, wire, group=self.group, async_op=True)
        return Pending(self, op, _nbytes(t), work, out, to=t.device if wire is not t else None)

    def all_gather_varlen(self, t: torch.Tensor, dim: int = 0) -> list[torch.Tensor]:
        """Tensors that differ only in size along ``dim``, from every rank, in rank order."""
        if self.size == 1:
            return [t]
        sizes = self._sizes(t, dim)
        padded = pad_along(t, dim, max(sizes))
        parts = self.all_gather(padded)
        return [p.narrow(dim, 0, s) for p, s in zip(parts, sizes)]

    def gather_varlen(self, t: torch.Tensor, dst: int = 0, dim: int = 0) -> list[torch.Tensor] | None:
        """Like :meth:`all_gather_varlen` but only rank ``dst`` receives (others get None).

        Point-to-point, so each rank sends exactly its own part (a host holding nothing sends
        nothing), instead of every part padded to the largest.
        """
        if self.size == 1:
            return [t]
        sizes = self._sizes(t, dim)
        t0 = self.stats.now()
        if self.rank != dst:
            if sizes[self.rank] > 0:
                dist.send(self._wire(t), dst=self.global_rank(dst), group=self.group)
            self.stats.record("gather", _nbytes(t), self.stats.now() - t0)
            return None
        parts, reqs = [], []
        host = "cpu" if self.staged(t.device) else t.device
        for r, size in enumerate(sizes):
            if r == dst:
                parts.append(t)
                continue
            shape = list(t.shape)
            shape[dim] = size
            buf = t.new_empty(shape, device=host)
            parts.append(buf)
            if size > 0:
                reqs.append(dist.irecv(buf, src=self.global_rank(r), group=self.group))
        for req in reqs:
            req.wait()
        self.stats.record("gather", 0, self.stats.now() - t0)
        return [p.to(t.device) for p in parts]

    def exchange(self, sends: dict[int, torch.Tensor], recv_shapes: dict[int, tuple[int, ...]], dtype: torch.dtype,
                 device: torch.device | None = None, op: str = "exchange") -> dict[int, torch.Tensor]:
        """Point to point: send ``sends[dst]`` to each ``dst`` and receive a tensor of
        ``recv_shapes[src]`` from each ``src``, all at once; returns the received tensors by source.

        Both sides must agree on the shapes (callers derive them from the same pure plan). The
        wait has the group's timeout. Counted as one ``op`` call with the bytes sent.
        """
        if device is None:
            device = next(iter(sends.values())).device if sends else torch.device("cpu")
        host = torch.device("cpu") if self.staged(device) else device
        got = {src: torch.empty(shape, dtype=dtype, device=host) for src, shape in recv_shapes.items()}
        ops = [dist.P2POp(dist.isend, self._wire(t), self.global_rank(dst), self.group)
               for dst, t in sends.items() if t.numel()]
        ops += [dist.P2POp(dist.irecv, buf, self.global_rank(src), self.group) for src, buf in got.items() if buf.numel()]
        nbytes = sum(_nbytes(t) for t in sends.values())
        if self.size == 1 or not ops:
            if self.size > 1:
                self.stats.record(op, 0, 0.0)
            return {src: buf.to(device) for src, buf in got.items()}
        with self._timed(op, nbytes):
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return {src: buf.to(device) for src, buf in got.items()}

    def p2p(self, sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]],
            op: str = "p2p") -> None:
        """One batch of point-to-point messages, received in place: each ``(dst, t)`` of ``sends``
        goes to ``dst``; each ``(src, buf)`` of ``recvs`` (contiguous, e.g. a slice of a larger
        preallocated tensor) is filled from ``src``. Two ranks list their messages to each other in
        the same order. Waits with the group's timeout; one ``op`` call, counting the bytes sent."""
        ops = [dist.P2POp(dist.isend, self._wire(t), self.global_rank(dst), self.group) for dst, t in sends if t.numel()]
        landing = []  # (the caller's buffer, the host buffer received into) where staged
        for src, buf in recvs:
            if not buf.is_contiguous():
                raise ValueError(f"a p2p receive buffer must be contiguous (from rank {src}, shape {tuple(buf.shape)})")
            if buf.numel():
                wire = torch.empty_like(buf, device="cpu") if self.staged(buf.device) else buf
                if wire is not buf:
                    landing.append((buf, wire))
                ops.append(dist.P2POp(dist.irecv, wire, self.global_rank(src), self.group))
        nbytes = sum(_nbytes(t) for _, t in sends)
        if self.size == 1 or not ops:
            return
        with self._timed(op, nbytes):
            for req in dist.batch_isend_irecv(ops):
                req.wait()
            for buf, wire in landing:
                buf.copy_(wire)

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """:meth:`broadcast_start` and its wait: ``t`` (made contiguous) filled in place and returned."""
        if self.size == 1:
            return t
        t = t.contiguous()
        got = self.broadcast_start(t, src).wait()[0]
        if got is not t:
            t.copy_(got)
        return t

    def broadcast_start(self, t: torch.Tensor, src: int, op: str = "broadcast") -> "Pending":
        """Start a broadcast from rank ``src``: ``t`` is what it sends, elsewhere the buffer that
        receives (the same shape); ``.wait()`` returns ``[t]`` filled. Counted as one ``op`` call
        with the bytes sent (none on the receiving ranks), the seconds those spent waiting."""
        if self.size == 1:
            return Pending(self, op, _nbytes(t), None, [t])
        if not t.is_contiguous():
            raise ValueError(f"a broadcast buffer must be contiguous (shape {tuple(t.shape)})")
        wire = self._wire(t)
        work = dist.broadcast(wire, src=self.global_rank(src), group=self.group, async_op=True)
        sent = _nbytes(t) if self.rank == src else 0
        return Pending(self, op, sent, work, [wire], to=t.device if wire is not t else None)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)

    def record_external(self, op: str, nbytes: int, seconds: float) -> None:
        """Count an exchange a library performed itself (e.g. DeepSpeed's all-to-all)."""
        self.stats.record(op, nbytes, seconds)

    def ring(self) -> "RingComm":
        return RingComm(self)

    def _sizes(self, t: torch.Tensor, dim: int) -> list[int]:
        local = torch.tensor([t.shape[dim]], dtype=torch.long, device="cpu" if self.staged(t.device) else t.device)
        out = [torch.empty_like(local) for _ in range(self.size)]
        with self._timed("all_gather_sizes", _nbytes(local)):
            dist.all_gather(out, local, group=self.group)
        return [int(x.item()) for x in out]


@dataclass
class Pending:
    comm: Comm
    op: str
    nbytes: int
    work: object
    result: list[torch.Tensor]
    to: torch.device | None = None  # staged: the device the received host copies go to

    def wait(self) -> list[torch.Tensor]:
        t0 = self.comm.stats.now()
        if self.work is not None:
            self.work.wait()
            self.work = None
        if self.to is not None:
            self.result, self.to = [r.to(self.to) for r in self.result], None
        if self.comm.size > 1:
            self.comm.stats.record(self.op, self.nbytes, self.comm.stats.now() - t0)
        return self.result


def pad_along(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``t`` zero-padded along ``dim`` to ``size`` (contiguous): same-shape messages from parts
    that differ in length there."""
    if t.shape[dim] == size:
        return t.contiguous()
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim).contiguous()


class RingComm:
    """Pass a tensor to the next rank while receiving the previous rank's, asynchronously.

    ``send_recv`` queues the pair, ``commit`` starts it, ``wait`` blocks (with the group's
    timeout) and returns the received tensor. A step is counted as one ``ring_send_recv``.
    """

    def __init__(self, comm: Comm):
        self.comm = comm
        self._ops: list[dist.P2POp] = []
        self._reqs: list = []
        self._bytes = 0
        self._recv: torch.Tensor | None = None
        self._landing: list[tuple[torch.Tensor, torch.Tensor]] = []  # staged: (caller's buffer, host buffer)
        self._committed = False

    def send_recv(self, to_send, into=None):
        """Queue sending ``to_send`` (a tensor, or a tuple of tensors: one message each) to the next
        rank and receiving the previous rank's into ``into`` (the same structure and shapes;
        allocated when None, so a caller can alternate two buffers instead). Returns the receive
        buffers."""
        c = self.comm
        single = isinstance(to_send, torch.Tensor)
        sends = [t.contiguous() for t in ((to_send,) if single else to_send)]
        recvs = [torch.empty_like(t) for t in sends] if into is None else list((into,) if single else into)
        if [(t.shape, t.dtype) for t in recvs] != [(t.shape, t.dtype) for t in sends]:
            raise ValueError(f"ring receive buffers {[tuple(t.shape) for t in recvs]} do not match what is sent "
                             f"{[tuple(t.shape) for t in sends]}")
        nxt, prv = (c.rank + 1) % c.size, (c.rank - 1) % c.size
        for out, got in zip(sends, recvs):
            wire = torch.empty_like(got, device="cpu") if c.staged(got.device) else got
            if wire is not got:
                self._landing.append((got, wire))
            # even ranks send first and odd ranks receive first, so blocking transports cannot deadlock
            send = dist.P2POp(dist.isend, c._wire(out), c.global_rank(nxt), c.group)
            get = dist.P2POp(dist.irecv, wire, c.global_rank(prv), c.group)
            self._ops += [send, get] if c.rank % 2 == 0 else [get, send]
            self._bytes += _nbytes(out)
        self._recv = recvs[0] if single else tuple(recvs)
        return self._recv

    def commit(self) -> None:
        if self._committed:
            raise RuntimeError("RingComm.commit called twice without wait")
        self._reqs = dist.batch_isend_irecv(self._ops)
        self._committed = True

    def wait(self) -> torch.Tensor:
        if not self._committed or self._recv is None:
            # without commit nothing was sent, and the receive buffer would come back unfilled
            raise RuntimeError("RingComm.wait called without a committed step: call send_recv(tensor), "
                               "then commit(), then wait()")
        t0 = self.comm.stats.now()
        for req in self._reqs:
            req.wait()
        for buf, wire in self._landing:
            buf.copy_(wire)
        self.comm.stats.record("ring_send_recv", self._bytes, self.comm.stats.now() - t0)
        recv = self._recv
        self._ops, self._reqs, self._bytes, self._recv, self._committed = [], [], 0, None, False
        self._landing = []
        return recv
