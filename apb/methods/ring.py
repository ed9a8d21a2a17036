"""``ring``: exact causal attention with K/V passed round a ring of hosts.

Host ``r`` holds zigzag chunks ``r`` and ``2W-1-r``. At step ``s`` it holds the K/V of host
``(r - s) mod W`` and sends it on to ``r + 1`` while computing on it (send/commit before the
compute, wait after). A query chunk ``i`` attends to a key chunk ``j`` fully if ``j < i``,
causally if ``j == i``, and not at all if ``j > i``; the partials are merged by LSE. Padding
lies only at the global end, so it always falls in a skipped or causally masked position.
Communication per layer: ``W-1`` ring steps of ``2 x kv_heads x (n/W) x head_dim`` elements.
"""

from __future__ import annotations

import torch

from apb.kernels import attention, merge_many
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

    def layout(self, n_tokens, world_size, n_query=0):
        return layout.zigzag(n_tokens, world_size)

    def attention(self, ctx, module, q, k, v, scale):
        comm, world = ctx.comm, ctx.comm.size
        mine = ctx.mine
        size = mine.chunks[0].size
        q_parts = [(c.chunk_id, q[:, :, i * size:(i + 1) * size]) for i, c in enumerate(mine.chunks)]
        partials: list[list] = [[] for _ in q_parts]
        # keys and values travel as one tensor, side by side in the last dim (their head sizes may differ: MLA)
        kv, dk = torch.cat([k, v], dim=-1), k.shape[-1]
        ring = comm.ring()
        for step in range(world):
            last = step == world - 1
            if not last:
                ring.send_recv(kv)
                ring.commit()
            src_chunks = ctx.slices[(ctx.rank - step) % world].chunks
            for qi, (q_chunk, q_part) in enumerate(q_parts):
                for kj, kc in enumerate(src_chunks):
                    if kc.chunk_id > q_chunk:
                        continue
                    sl = slice(kj * size, (kj + 1) * size)
                    partials[qi].append(attention(q_part, kv[:, :, sl, :dk], kv[:, :, sl, dk:],
                                                  causal=kc.chunk_id == q_chunk, scale=scale, **ctx.score_opts))
            if not last:
                kv = ring.wait()
        outs = [merge_many(p)[0] for p in partials]
        return torch.cat(outs, dim=2).to(q.dtype)
