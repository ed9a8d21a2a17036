"""``ring``: exact causal attention with K/V passed round a ring of hosts.

Host ``r`` holds zigzag chunks ``r`` and ``2W-1-r``. At step ``s`` it holds the K/V of host
``(r - s) mod W`` and sends it on to ``r + 1`` while computing on it (send/commit before the
compute, wait after), alternating two receive buffers kept for the prompt, so nothing is
allocated or copied per step. A query chunk ``i`` attends to a key chunk ``j`` fully if ``j < i``,
causally if ``j == i``, and not at all if ``j > i``; each partial is merged by LSE into one
float32 accumulator per query chunk as soon as it is computed. Padding
lies only at the global end, so it always falls in a skipped or causally masked position.
Communication per layer: ``W-1`` ring steps of ``2 x kv_heads x (n/W) x head_dim`` elements.
"""

from __future__ import annotations

import torch

from apb.kernels import attention, merge_
from apb.methods.registry import register_method
from apb.methods.base import Method
from apb.methods.cost import HostWork
from apb.parallel import layout


@register_method("ring")
class Ring(Method):
    @classmethod
    def cost(cls, n, w, shape, sizes):
        # zigzag: every host n^2/2W pairs; a plain ring's host W-1 does 2W-1 of the W^2 half-blocks.
        # The K/V sends run behind the attention compute.
        b = n / w
        pairs = n * n / 2 / w if sizes.ring_balanced else (2 * w - 1) * b * b / 2
        kv_tok = 2 * shape.kv_heads * shape.head_dim * shape.bytes_per_param
        return HostWork(b, pairs, b, steps=w - 1, overlap_bytes=(w - 1) * b * kv_tok)

    def transfer_bytes(self, local, n_tokens, world, per_tok, passing, model_config, dtype_bytes):
        return 2 * local * per_tok if world > 1 else 0  # the chunk in flight and the one being attended

    def layout(self, n_tokens, world_size, n_query=0):
        return layout.zigzag(n_tokens, world_size)

    def attention(self, ctx, module, q, k, v, scale):
        comm, world = ctx.comm, ctx.comm.size
        mine = ctx.mine
        size = mine.chunks[0].size
        q_parts = [(c.chunk_id, q[:, :, i * size:(i + 1) * size]) for i, c in enumerate(mine.chunks)]
        acc_out = torch.empty(*q.shape[:3], v.shape[-1], dtype=torch.float32, device=q.device)
        acc_lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        first = [True] * len(q_parts)  # every query chunk sees at least its own chunk, causally
        # keys and values travel as two messages (their head sizes may differ: MLA), never stacked
        cur = (k.contiguous(), v.contiguous())
        bufs = _buffers(ctx, cur) if world > 1 else ()
        ring = comm.ring()
        for step in range(world):
            last = step == world - 1
            if not last:
                # the buffer received into was sent two steps ago: that send has completed
                ring.send_recv(cur, into=bufs[step % 2])
                ring.commit()
            src_chunks = ctx.slices[(ctx.rank - step) % world].chunks
            for qi, (q_chunk, q_part) in enumerate(q_parts):
                rows = slice(qi * size, (qi + 1) * size)
                for sl, causal in _calls(src_chunks, q_chunk, size):
                    out, lse = attention(q_part, cur[0][:, :, sl], cur[1][:, :, sl], causal=causal, scale=scale,
                                         **ctx.score_opts)
                    if first[qi]:  # the first partial is the accumulator: nothing to merge with yet
                        acc_out[:, :, rows].copy_(out)
                        acc_lse[:, :, rows].copy_(lse)
                        first[qi] = False
                    else:
                        merge_(acc_out[:, :, rows], acc_lse[:, :, rows], out, lse)
            if not last:
                cur = ring.wait()
        return acc_out.to(q.dtype)


def _calls(src_chunks, q_chunk: int, size: int) -> list[tuple[slice, bool]]:
    """The kernel calls of query chunk ``q_chunk`` over one host's chunks: (local rows, causal).
    Earlier chunks are seen whole, so adjacent ones go in one call (fewer, larger calls and merges);
    its own chunk is causal; later ones are not seen."""
    calls: list[tuple[slice, bool]] = []
    for kj, kc in enumerate(src_chunks):
        if kc.chunk_id > q_chunk:
            continue
        causal = kc.chunk_id == q_chunk
        sl = slice(kj * size, (kj + 1) * size)
        if calls and not causal and not calls[-1][1] and calls[-1][0].stop == sl.start:
            calls[-1] = (slice(calls[-1][0].start, sl.stop), False)
        else:
            calls.append((sl, causal))
    return calls


def _buffers(ctx, kv: tuple[torch.Tensor, torch.Tensor]):
    """Two (k, v) receive buffers of ``kv``'s shapes, allocated once per prompt (every layer of a
    model has the same shapes) and alternated by the ring steps."""
    key = ("ring_buffers",) + tuple((tuple(t.shape), t.dtype, str(t.device)) for t in kv)
    if key not in ctx.scratch:
        ctx.scratch[key] = tuple(tuple(torch.empty_like(t) for t in kv) for _ in range(2))
    return ctx.scratch[key]
