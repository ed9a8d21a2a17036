"""KV caches: this host's part, the gather to the decode host, and conversion to a HF cache.

A :class:`KVCache` holds each layer's K and V in that layer's own shape, (kv_heads, tokens,
width), with each token's global position (a multi-head latent attention model stores what
transformers caches for it instead: its latent and rotated-key parts, one "head" each, of
different sizes; see :mod:`apb.model.mla`). Layers may differ in heads and widths (Gemma 4's
global layers are twice as wide as its sliding ones) and nothing is padded.

Gathering sends every host's part to the decode host, checks that every position 0..n-1 appears
exactly once, and receives every part straight into its place in one preallocated buffer per
group of layers. For decoding, a layer receives only the positions transformers' own cache
keeps after a prefill (:func:`decode_keeps`): a sliding layer's last ``window - 1``, and nothing
for a layer that reuses an earlier one's K/V; such a layer holds the last ``tokens`` of the
positions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

try:  # transformers' stand-in for a layer that keeps no cache (KV sharing, layers without attention)
    from transformers.cache_utils import DummyLayer as _DUMMY
except ImportError:  # a transformers without one has no such layers
    _DUMMY = ()

from apb.parallel.comm import Comm


@dataclass
class KVCache:
    positions: torch.Tensor  # (tokens,) long
    #: per layer (k, v), each (kv_heads, tokens held, width); a layer holding fewer tokens than
    #: ``positions`` holds the last ones: a sliding layer's window (a host's cache is in position
    #: order in every layout), or a gathered cache trimmed for decoding
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    #: per layer, where a layer's (k, v) are the first tokens of buffers (1, kv_heads, tokens +
    #: room, width) with room for decoded tokens (a cache gathered with ``room``), those buffers;
    #: else None. :func:`to_hf_cache` hands them to transformers' cache without a copy
    rooms: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...] | None = None

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s (k, v): (kv_heads, tokens held, width)."""
        return self.kv[i]

    @property
    def n_layers(self) -> int:
        return len(self.kv)

    @property
    def n_tokens(self) -> int:
        return int(self.positions.numel())

    @property
    def shapes(self) -> tuple[tuple[int, int, int], ...] | None:
        """Per layer (kv_heads, key width, value width) where the layers differ, else None."""
        shapes = tuple((k.shape[0], k.shape[-1], v.shape[-1]) for k, v in self.kv)
        return shapes if len(set(shapes)) > 1 else None

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)

    @functools.cached_property
    def keys(self) -> torch.Tensor:
        """Every layer's keys stacked, (layers, kv_heads, tokens, width), zero-padded to the
        largest layer: a copy, made once, for comparing whole caches (``apb verify``, tests)."""
        return self._stacked(0)

    @functools.cached_property
    def values(self) -> torch.Tensor:
        return self._stacked(1)

    def _stacked(self, j: int) -> torch.Tensor:
        self._whole("stacking the layers")
        parts = [kv[j] for kv in self.kv]
        n = self.n_tokens
        heads, width = max(t.shape[0] for t in parts), max(t.shape[-1] for t in parts)
        if all(t.shape[0] == heads and t.shape[-1] == width for t in parts):
            return torch.stack(parts)
        out = parts[0].new_zeros(len(parts), heads, n, width)
        for i, t in enumerate(parts):
            out[i, :t.shape[0], :, :t.shape[-1]] = t
        return out

    @classmethod
    def from_layers(cls, positions: torch.Tensor, kv: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> "KVCache":
        """From per-layer (k, v) of shape (1, kv_heads, tokens, width): views, no copies (a layer
        that reuses an earlier one's K/V shares its tensors)."""
        layers = sorted(kv)
        if layers != list(range(len(layers))):
            missing = sorted(set(range(max(layers, default=-1) + 1)) - set(layers))
            raise ValueError(f"cache is missing layers {missing or [len(layers)]} (got {layers}): those layers never "
                             "called the attention, so they are not softmax attention; "
                             "apb.model.features.check_supported should have refused this model")
        return cls(positions.to(torch.long), tuple((kv[i][0][0], kv[i][1][0]) for i in layers))

    def sorted(self) -> "KVCache":
        self._whole("sorted")
        order = torch.argsort(self.positions)
        return KVCache(self.positions[order], tuple((k[:, order], v[:, order]) for k, v in self.kv))

    def head(self, n: int) -> "KVCache":
        """Positions ``0..n-1`` of a whole cache in position order (views)."""
        self._whole("head")
        return KVCache(self.positions[:n], tuple((k[:, :n], v[:, :n]) for k, v in self.kv))

    def _whole(self, what: str) -> None:
        short = [i for i, (k, _) in enumerate(self.kv) if k.shape[1] != self.n_tokens]
        if short:
            raise ValueError(f"{what}: layers {short} hold only their last positions (a sliding window, or a cache "
                             "gathered for decoding); prefill with whole_cache=True and gather with keep=None")

    def tails(self, keep: list[int]) -> "KVCache":
        """Each layer's positions from ``keep[layer]`` on (:func:`decode_keeps`; a layer ``keep``
        does not name keeps all), as views, of a cache in position order."""
        n = self.n_tokens
        kv = []
        for i, (k, v) in enumerate(self.kv):
            held = n - min(n, int(keep[i])) if i < len(keep) else n
            if held > k.shape[1]:
                raise ValueError(f"layer {i} holds its last {k.shape[1]} positions, {held} asked")
            kv.append((k[:, k.shape[1] - held:], v[:, v.shape[1] - held:]))
        # a layer's room stays where its tail is all it held (the tail is then the same view)
        rooms = None if self.rooms is None else tuple(
            room if room is not None and kv[i][0].shape[1] == self.kv[i][0].shape[1] else None
            for i, room in enumerate(self.rooms))
        return KVCache(self.positions, tuple(kv), rooms)

    def to(self, device) -> "KVCache":
        return KVCache(self.positions.to(device), tuple((k.to(device), v.to(device)) for k, v in self.kv))


def decode_keeps(model_config, n: int) -> list[int]:
    """Per layer, the first position transformers' own cache (``DynamicCache`` built from the
    config, as :func:`to_hf_cache` builds it) keeps after a prefill of ``n`` tokens: 0 for a
    global layer, ``n - (window - 1)`` for a sliding one, ``n`` (nothing) for a layer that keeps no
    K/V of its own. Each layer is asked by a prefill of ``n`` one-float tokens, so what is kept is
    transformers' own rule, whatever its version; a layer that refuses it keeps everything."""
    keeps = []
    probe = torch.zeros(1, 1, n, 1)
    for layer in DynamicCache(config=model_config).layers:
        if isinstance(layer, _DUMMY):
            keeps.append(n)
            continue
        try:
            layer.update(probe, probe)
            held = int(layer.keys.shape[-2])
        except Exception:  # noqa: BLE001 - a layer kind this probe cannot fill: keep every position
            held = n
        keeps.append(n - min(n, held))
    return keeps


def position_runs(positions: torch.Tensor) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges of local rows whose positions are consecutive (a host's chunks)."""
    p = positions.tolist()
    runs, lo = [], 0
    for i in range(1, len(p) + 1):
        if i == len(p) or p[i] != p[i - 1] + 1:
            runs.append((lo, i))
            lo = i
    return runs


def _segments(positions: torch.Tensor, first: int) -> list[tuple[int, int, int]]:
    """``(lo, hi, position of lo)`` of each run of consecutive positions, cut to positions ``>= first``."""
    out = []
    p = positions.tolist()
    for lo, hi in position_runs(positions):
        lo += max(0, min(first - p[lo], hi - lo))
        if lo < hi:
            out.append((lo, hi, p[lo]))
    return out


def _groups(n_layers: int, keep: list[int] | None) -> dict[int, list[int]]:
    """Layers by the first position they keep (a layer ``keep`` does not name keeps all), in
    ascending order of it."""
    groups: dict[int, list[int]] = {}
    for i in range(n_layers):
        groups.setdefault(int(keep[i]) if keep is not None and i < len(keep) else 0, []).append(i)
    return dict(sorted(groups.items()))


def _widths(kv, layers: list[int]) -> list[tuple[int, int, int, int]]:
    """Per layer of a group (heads, key width, value width, offset in the group's token row)."""
    out, off = [], 0
    for i in layers:
        k, v = kv[i]
        out.append((k.shape[0], k.shape[-1], v.shape[-1], off))
        off += k.shape[0] * (k.shape[-1] + v.shape[-1])
    return out


def _check_held(local: KVCache, layer: int, short: int, lowest: int) -> None:
    """A layer holding only its rows from ``short`` on cannot send row ``lowest``."""
    if lowest < short:
        raise ValueError(f"layer {layer} holds only this host's positions from {int(local.positions[short])}, "
                         f"and the gather asks from {int(local.positions[lowest])}: a cache gathered whole needs a "
                         "prefill with whole_cache=True")


def gather_cache(local: KVCache, comm: Comm, dst: int = 0, keep: list[int] | None = None,
                 room: int | None = None) -> KVCache | None:
    """Send every host's cache to ``dst``; returns the whole cache, in position order, on ``dst``.

    ``keep``: per layer the first position to send (:func:`decode_keeps`), None for all. The
    positions travel first, so ``dst`` can check that every position 0..n-1 comes exactly once and
    allocate once: one token-major buffer per group of layers that keep the same positions, each
    token's K and V of those layers side by side in its row. Each run of consecutive positions a
    host holds is then one message per group, received straight into its place; the returned
    layers are views of those buffers, in each layer's own shape.

    ``room`` (decoding): ``dst`` receives into one buffer per layer instead, in transformers'
    layout (1, kv_heads, tokens + room, width), with room for ``room`` decoded tokens
    (``KVCache.rooms``); the messages are the same, each received into a staging buffer of one
    run of positions and copied into the layers, and ``dst``'s own runs are copied straight from
    its layers, so that ``dst`` holds the cache once (beside its own part and one run), not once in
    the gather's buffers and again in transformers' cache.
    """
    device = local.kv[0][0].device if local.kv else local.positions.device
    pos = comm.gather_varlen(local.positions.to(device), dst=dst, dim=0)
    groups = _groups(local.n_layers, keep)
    sample = local.kv[0][0] if local.kv else torch.zeros(0)
    sends, packs = [], {}
    for first, layers in groups.items():
        if pos is not None and room is not None:  # placed from the layers by _receive_into_layers
            break
        widths = _widths(local.kv, layers)
        row = sum(h * (dk + dv) for h, dk, dv, _ in widths)
        segs = _segments(local.positions, first)
        rows = sum(hi - lo for lo, hi, _ in segs)
        if not rows or not row:
            continue
        # token-major, so a run of positions is one contiguous slice
        packed = sample.new_empty(rows, row)
        wanted = torch.cat([torch.arange(lo, hi) for lo, hi, _ in segs])  # local rows, in message order
        rows_at: dict[int, torch.Tensor | None] = {}  # by how many leading rows a layer lacks: its rows
        for i, (h, dk, dv, off) in zip(layers, widths):
            k, v = local.kv[i]
            short = local.n_tokens - k.shape[1]  # a layer holding only its last rows (a sliding window)
            _check_held(local, i, short, int(wanted.min()))
            if short not in rows_at:  # None: every row the layer holds, in its order (no copy)
                everything = rows == k.shape[1] and bool((wanted == torch.arange(short, local.n_tokens)).all())
                rows_at[short] = None if everything else (wanted - short).to(device)
            if rows_at[short] is not None:
                k, v = k[:, rows_at[short]], v[:, rows_at[short]]
            packed[:, off:off + h * dk].unflatten(1, (h, dk)).copy_(k.transpose(0, 1))
            packed[:, off + h * dk:off + h * (dk + dv)].unflatten(1, (h, dv)).copy_(v.transpose(0, 1))
        packs[first] = packed
        at = 0
        for lo, hi, position in segs:
            sends.append((packed[at:at + hi - lo], position, first))
            at += hi - lo
    if pos is None:  # not the decode host: send each run of each group
        comm.p2p([(dst, t) for t, _, _ in sends], [], op="gather")
        return None
    cpu = [p.cpu() for p in pos]
    n = sum(int(p.numel()) for p in cpu)
    every = torch.sort(torch.cat(cpu)).values if n else torch.zeros(0, dtype=torch.long)
    layout = {first: _widths(local.kv, layers) for first, layers in groups.items()}
    rows_of = {first: sum(h * (dk + dv) for h, dk, dv, _ in w) for first, w in layout.items()}
    if not torch.equal(every, torch.arange(n)):
        comm.p2p([], [(r, sample.new_empty(hi - lo, rows_of[first])) for first in groups if rows_of[first]
                      for r, p in enumerate(cpu) if r != comm.rank
                      for lo, hi, _ in _segments(p, first)], op="gather")  # drain the sends
        raise RuntimeError("gathered cache does not hold each position 0..n-1 exactly once: "
                           f"first positions {every[:8].tolist()}, total {n}")
    if room is not None:
        return _receive_into_layers(local, comm, cpu, n, groups, layout, rows_of, sample, room)
    kv: list = [None] * local.n_layers
    recvs = []
    for first, layers in groups.items():
        start = min(first, n)
        whole = sample.new_empty(n - start, rows_of[first])
        if rows_of[first]:
            for r, p in enumerate(cpu):
                if r == comm.rank:
                    continue
                for lo, hi, at in _segments(p, first):
                    recvs.append((r, whole[at - start:at - start + hi - lo]))
            for t, position, f in sends:  # this host's own runs: copied, not sent
                if f == first:
                    whole[position - start:position - start + len(t)] = t
        for i, (h, dk, dv, off) in zip(layers, layout[first]):
            kv[i] = (whole[:, off:off + h * dk].unflatten(1, (h, dk)).transpose(0, 1),
                     whole[:, off + h * dk:off + h * (dk + dv)].unflatten(1, (h, dv)).transpose(0, 1))
    del packs, sends
    comm.p2p([], recvs, op="gather")
    return KVCache(torch.arange(n, device=device), tuple(kv))


def _receive_into_layers(local, comm, cpu, n, groups, layout, rows_of, sample, room) -> KVCache:
    """:func:`gather_cache` on the decode host with ``room``: every layer in its own buffer with
    room for the decoded tokens, filled from this host's layers, then from each other host's runs
    in turn (each received into a staging buffer of that run, then copied into the layers)."""
    device = sample.device
    kv: list = [None] * local.n_layers
    rooms: list = [None] * local.n_layers
    for first, layers in groups.items():
        held = n - min(first, n)
        for i, (h, dk, dv) in zip(layers, ((h, dk, dv) for h, dk, dv, _ in layout[first])):
            if not held:  # a layer that keeps nothing: no buffer, no room
                kv[i] = (sample.new_empty(h, 0, dk), sample.new_empty(h, 0, dv))
                continue
            extra = room if held == n else 0  # a trimmed (sliding) layer is copied into transformers' own class
            rooms[i] = (sample.new_empty(1, h, held + extra, dk), sample.new_empty(1, h, held + extra, dv))
            kv[i] = (rooms[i][0][0, :, :held], rooms[i][1][0, :, :held])

    def place(first: int, rows: torch.Tensor, position: int) -> None:
        at = position - min(first, n)
        for i, (h, dk, dv, off) in zip(groups[first], layout[first]):
            k, v = kv[i]
            k[:, at:at + len(rows)] = rows[:, off:off + h * dk].unflatten(1, (h, dk)).transpose(0, 1)
            v[:, at:at + len(rows)] = rows[:, off + h * dk:off + h * (dk + dv)].unflatten(1, (h, dv)).transpose(0, 1)

    for first, layers in groups.items():  # this host's own runs: copied from its layers, not sent
        for lo, hi, position in _segments(local.positions, first):
            at = position - min(first, n)
            for i in layers:
                short = local.n_tokens - local.kv[i][0].shape[1]  # a layer holding only its last rows
                _check_held(local, i, short, lo)
                for got, t in zip(kv[i], local.kv[i]):
                    got[:, at:at + hi - lo] = t[:, lo - short:hi - short]
    largest = max((hi - lo for p in cpu for first in groups for lo, hi, _ in _segments(p, first)), default=0)
    staging = sample.new_empty(largest * max(rows_of.values(), default=0))
    for r, p in enumerate(cpu):  # every other host's runs in the order it sends them, one at a time
        if r == comm.rank:
            continue
        for first in groups:
            if not rows_of[first]:
                continue
            for lo, hi, at in _segments(p, first):
                buf = staging[:(hi - lo) * rows_of[first]].view(hi - lo, rows_of[first])
                comm.p2p([], [(r, buf)], op="gather")
                place(first, buf, at)
    return KVCache(torch.arange(n, device=device), tuple(kv), tuple(rooms))


class _RoomyLayer(DynamicLayer):
    """transformers' growing cache layer with room for ``room`` more tokens after the prompt:
    each decoded token's K/V is written into place, where ``DynamicLayer`` concatenates, that is
    copies the layer's whole cache, at every step. Its keys and values are views of the first
    tokens of one buffer (each head's rows contiguous), holding the same values transformers' own
    layer would; past the room, or once something other than :meth:`update` has replaced them
    (a crop keeps them a view and is followed), it grows as ``DynamicLayer`` does."""

    _layer_type = None  # never registered as the class transformers builds for a layer type

    def __init__(self, bufs: tuple[torch.Tensor, torch.Tensor], held: int):
        super().__init__()
        self._bufs = bufs
        self.keys, self.values = (buf[:, :, :held] for buf in bufs)
        self.dtype, self.device, self.is_initialized = bufs[0].dtype, bufs[0].device, True

    @classmethod
    def copied(cls, k: torch.Tensor, v: torch.Tensor, room: int) -> "_RoomyLayer":
        """(kv_heads, tokens, width) k and v copied into buffers with ``room`` more tokens."""
        heads, tokens, _ = k.shape
        bufs = tuple(t.new_empty(1, heads, tokens + room, t.shape[-1]) for t in (k, v))
        for buf, t in zip(bufs, (k, v)):
            buf[0, :, :tokens].copy_(t)
        return cls(bufs, tokens)

    def _in_place(self, extra: int) -> bool:
        held = self.keys.shape[-2]
        return all(t.data_ptr() == buf.data_ptr() and t.stride() == buf.stride() and held + extra <= buf.shape[2]
                   for t, buf in zip((self.keys, self.values), self._bufs))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self._in_place(key_states.shape[-2]):
            return super().update(key_states, value_states, *args, **kwargs)
        held, end = self.keys.shape[-2], self.keys.shape[-2] + key_states.shape[-2]
        for buf, t in zip(self._bufs, (key_states, value_states)):
            buf[:, :, held:end].copy_(t)
        self.keys, self.values = (buf[:, :, :end] for buf in self._bufs)
        return self.keys, self.values


def to_hf_cache(cache: KVCache, model_config, room: int = 0):
    """A transformers ``DynamicCache`` holding ``cache`` (batch 1, in position order), ready for
    decoding. A layer holding only its last positions (:func:`decode_keeps`) is told how many
    tokens came before them, as transformers' own prefill would have left it. ``room``: how many
    tokens will be decoded; each growing (global) layer then holds a buffer with room for them,
    so that no decoding step copies the layer's cache (transformers' own layer concatenates at
    every step): the buffer the layer was gathered into (``KVCache.rooms``), else a copy."""
    hf = DynamicCache(config=model_config)
    n = cache.n_tokens
    for layer in range(cache.n_layers):
        if isinstance(hf.layers[layer], _DUMMY):  # a layer that reuses an earlier one's K/V keeps none
            continue
        k, v = cache.layer(layer)
        given = cache.rooms[layer] if cache.rooms is not None else None
        if room > 0 and type(hf.layers[layer]) is DynamicLayer:  # exactly: a subclass keeps its own rules
            if given is not None and given[0].data_ptr() == k.data_ptr() and given[0].shape[2] >= k.shape[1] + room:
                # gathered with room: these buffers become transformers' cache, no copy
                hf.layers[layer] = _RoomyLayer(given, k.shape[1])
            else:
                hf.layers[layer] = _RoomyLayer.copied(k, v, room)
        else:
            hf.update(k[None].contiguous(), v[None].contiguous(), layer)
        held = hf.layers[layer]
        if k.shape[1] < n and isinstance(getattr(held, "cumulative_length", None), int):
            held.cumulative_length = n  # the window's tail is all it keeps; the positions before it count
        if held.get_seq_length() != n:
            raise RuntimeError(f"layer {layer}: transformers' {type(held).__name__} reports "
                               f"{held.get_seq_length()} cached tokens where the prompt has {n}; this transformers "
                               "keeps a sliding layer's length elsewhere: set decode.mode: distributed, or install "
                               "the transformers version apb was tested with")
    return hf
