"""Exact attention of new tokens over caches that stay spread over the hosts.

Used wherever a token must see *every* cached context token exactly once: the query phase of
star/apb, the fused query of spava, and distributed decoding. Each host attends the new
queries to its own cache (no mask: all of it lies before them); the host that holds the new
tokens also attends them to themselves, causally. The partial outputs and their LSEs are
all-gathered and merged in rank order, so every host ends with the same exact result.

A layer's softcap and sinks reach every kernel call as score options; the sink rides on the
holder's causal call (the one with each new token's own key), so it counts once in the merge.
An MLA layer caches its latent pair, which ``expand`` (the layer's ``expand_kv``) turns back
into keys and values before attending.
"""

from __future__ import annotations

import torch

from apb.kernels import attention, merge_many
from apb.methods.base import score_options
from apb.parallel.comm import Comm
from apb.parallel.layout import rows_of


def local_partial(q, cache_k, cache_v, new_k, new_v, scale, holds_new: bool, window: int | None = None,
                  q_pos: torch.Tensor | None = None, cache_pos: torch.Tensor | None = None, **score_opts):
    """This host's share: (out, lse) of ``q`` over its cache, plus the new tokens if it holds them.

    With a sliding ``window``, ``q_pos`` and ``cache_pos`` (the new tokens' and the cache's
    positions) mask the cached keys each new token no longer sees; the caller leaves out the
    entries none of them sees. The new tokens are consecutive, so among themselves the window is
    aligned.
    """
    parts = []
    if cache_k is not None and cache_k.shape[2] > 0:
        by_pos = {} if window is None else dict(window=window, q_pos=q_pos, k_pos=cache_pos)
        parts.append(attention(q, cache_k, cache_v, causal=False, scale=scale, **by_pos, **score_opts))
    if holds_new:
        extra = {} if window is None or new_k.shape[2] <= window else {"window": window}
        parts.append(attention(q, new_k, new_v, causal=True, scale=scale, **extra, **score_opts))
    if not parts:  # a host with nothing to contribute: the merge's identity
        return torch.zeros(*q.shape[:3], new_v.shape[-1], dtype=torch.float32, device=q.device), \
            torch.full(q.shape[:3], float("-inf"), device=q.device)
    return merge_many(parts)


def merge_over_hosts(comm: Comm, out: torch.Tensor, lse: torch.Tensor, op: str = "partial_merge") -> torch.Tensor:
    """All-gather (out, lse) partials and merge them; float32 result, identical on every host."""
    return merge_over_hosts_start(comm, out, lse, op)()


def merge_over_hosts_start(comm: Comm, out: torch.Tensor, lse: torch.Tensor, op: str = "partial_merge"):
    """:func:`merge_over_hosts` with the all-gather started now: returns ``finish()``, which waits
    and merges, so the caller can compute in between."""
    packed = torch.cat([out.float(), lse.float()[..., None]], dim=-1)
    pending = comm.all_gather_start(packed, op=op)

    def finish() -> torch.Tensor:
        parts = pending.wait()
        return merge_many([(p[..., :-1], p[..., -1]) for p in parts])[0]

    return finish


class _Appendable:
    """One layer's cache on the host that appends the new tokens: tensors ``(b, h, t, d)`` in a
    buffer with room to spare, so a decoding step writes its entry in place instead of copying
    the whole cache (``torch.cat``) every step; the buffer doubles when the room runs out."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], room: int):
        self._fill(tensors, room)

    def _fill(self, tensors: tuple[torch.Tensor, ...], room: int) -> None:
        n = tensors[0].shape[2]
        self.bufs = tuple(t.new_empty(*t.shape[:2], n + max(room, 1), t.shape[3]) for t in tensors)
        for buf, t in zip(self.bufs, tensors):
            buf[:, :, :n].copy_(t)
        self.start, self.stop = 0, n

    @property
    def capacity(self) -> int:
        return self.bufs[0].shape[2]

    def view(self) -> tuple[torch.Tensor, ...]:
        return tuple(b[:, :, self.start:self.stop] for b in self.bufs)

    def append(self, new: tuple[torch.Tensor, ...]) -> None:
        n = new[0].shape[2]
        if self.stop + n > self.capacity:
            live = self.stop - self.start
            grown = tuple(b.new_empty(*b.shape[:2], max(2 * live, live + n), b.shape[3]) for b in self.bufs)
            for g, b in zip(grown, self.bufs):
                g[:, :, :live].copy_(b[:, :, self.start:self.stop])
            self.bufs, self.start, self.stop = grown, 0, live
        for b, t in zip(self.bufs, new):
            b[:, :, self.stop:self.stop + n].copy_(t)
        self.stop += n

    def keep(self, rows: slice | torch.Tensor) -> None:
        """Keep only ``rows`` (of the live entries): a leading cut moves the start; anything else
        copies the kept entries into a fresh buffer."""
        if isinstance(rows, slice) and rows.stop == self.stop - self.start:
            self.start += rows.start
            return
        kept = tuple(t[:, :, rows] for t in self.view())
        self._fill(kept, self.capacity - kept[0].shape[2])


class CacheAttnContext:
    """Attention context for tokens that come after a distributed cache (query phase, decoding).

    ``kv`` maps layer -> this host's cached (k, v) (an MLA layer: its latent pair); ``positions``
    are their global positions (a layer holding fewer entries holds the last ones: a sliding
    layer's window, :meth:`AttnContext.window_tail`). The host with ``holds_new`` appends the new
    tokens' entries to its cache as they are computed, into a buffer with ``room`` tokens to
    spare. With ``trim_windows`` (decoding, where the cache is not kept afterwards), a sliding
    layer drops the entries no later token can see, on every host, and keeps its own positions
    from then on.

    Which entries a sliding layer still sees is decided on a CPU copy of the positions, so a
    step never waits on the device for it: the selection is a slice (a view) when the entries
    are one run, as they are in every layout (a host's cache is in position order).
    """

    def __init__(self, comm: Comm, kv: dict, positions: torch.Tensor, holds_new: bool, trim_windows: bool = False,
                 room: int = 0, positions_cpu: torch.Tensor | None = None):
        self.comm = comm
        self.kv = dict(kv)
        self.positions = positions
        self.holds_new = holds_new
        self.trim_windows = trim_windows
        self.room = room
        self._buffers: dict[int, _Appendable] = {}
        # every later decision is made on this copy (given, or copied once per prompt)
        self._cpu = positions.cpu() if positions_cpu is None else positions_cpu
        self._new: tuple[torch.Tensor, torch.Tensor] | None = None  # (cpu, device) positions of the step
        self._step_cpu = self._cpu  # the cache's positions as they were before this step's tokens
        self._step_dev = positions
        self._layer_positions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # trimmed layers: (cpu, device)
        for layer, (k, _) in self.kv.items():  # a sliding layer's prefill kept only its last positions
            held = k.shape[2]
            if held < len(self._cpu):
                self._layer_positions[layer] = (self._cpu[len(self._cpu) - held:], positions[len(self._cpu) - held:])

    def start_step(self, positions: torch.Tensor) -> None:
        """The new tokens' positions (best given on the CPU); every layer of this step sees the
        cache as it was before them."""
        cpu = positions.cpu()
        device = self.positions.device
        self._new = (cpu, cpu.to(device, non_blocking=True) if positions.device.type == "cpu" else positions)
        self._step_cpu, self._step_dev = self._cpu, self.positions

    def step(self, module, q, k, v, scale, sliding_window=None, softcap=None, sinks=None, latent=None,
             expand=None) -> torch.Tensor:
        layer = int(module.layer_idx)
        self.comm.stats.layer = layer
        self.comm.stats.tick(layer)
        cached = self._cached(layer)
        window = {}
        if sliding_window is not None:
            if self._new is None:
                raise RuntimeError("CacheAttnContext.start_step(positions) must come before a sliding layer")
            cached, window = self._in_window(layer, cached, sliding_window, q.device)
        cache_k, cache_v = (None, None) if cached is None else cached
        if expand is not None and cache_k is not None and cache_k.shape[2] > 0:
            cache_k, cache_v = expand(cache_k, cache_v)
        out, lse = local_partial(q, cache_k, cache_v, k, v, scale, self.holds_new, **window,
                                 **score_options(softcap, sinks))
        merged = merge_over_hosts(self.comm, out, lse)
        if self.holds_new:
            self._append(layer, latent or (k, v))
        return merged.to(q.dtype)

    def _cached(self, layer: int):
        buf = self._buffers.get(layer)
        return buf.view() if buf is not None else self.kv.get(layer)

    def _in_window(self, layer, cached, window: int, device):
        """The cached entries a sliding layer's new tokens may still see, and the kernel's
        position arguments. With ``trim_windows`` the others are dropped for good (positions only
        grow), else only left out of this step."""
        new_cpu, new_dev = self._new
        pos_cpu, pos_dev = self._layer_positions.get(layer, (self._step_cpu, self._step_dev))
        if cached is not None and cached[0].shape[2] > 0:
            seen = pos_cpu > int(new_cpu.min()) - window
            rows = rows_of(seen, device)
            if not (isinstance(rows, slice) and rows == slice(0, len(pos_cpu))):
                cached = tuple(t[:, :, rows] for t in cached)
                pos_cpu, pos_dev = pos_cpu[seen], pos_dev[rows]
                if self.trim_windows:
                    if layer in self._buffers:
                        self._buffers[layer].keep(rows)
                    self.kv[layer] = cached
                    self._layer_positions[layer] = (pos_cpu, pos_dev)
        return cached, dict(window=window, q_pos=new_dev.to(device), cache_pos=pos_dev.to(device))

    def _append(self, layer: int, new: tuple[torch.Tensor, ...]) -> None:
        cached = self._cached(layer)
        if cached is None:
            self.kv[layer] = new
        else:
            if layer not in self._buffers:
                self._buffers[layer] = _Appendable(cached, self.room + new[0].shape[2])
            self._buffers[layer].append(new)
            self.kv[layer] = self._buffers[layer].view()
        if layer in self._layer_positions:
            pos_cpu, pos_dev = self._layer_positions[layer]
            self._layer_positions[layer] = (torch.cat([pos_cpu, self._new[0]]), torch.cat([pos_dev, self._new[1]]))
        if layer == 0 and self._new is not None:
            self._cpu = torch.cat([self._cpu, self._new[0]])
            self.positions = torch.cat([self.positions, self._new[1].to(self.positions.device)])
