"""``ulysses``: exact attention by all-to-all from sequence shards to head shards.

Host ``r`` holds contiguous chunk ``r`` (the prompt is right-padded to a multiple of ``W``).
DeepSpeed's :class:`DistributedAttention` all-to-alls Q/K/V so each host holds the whole
sequence for ``H/W`` heads, runs causal attention locally, and all-to-alls the output back.
When the query heads do not split evenly, zero heads are appended up to the next multiple of
``W`` (their outputs are dropped): hosts then hold ``ceil(H/W)`` or fewer real heads, and the
padding adds ``(H'-H)/H`` to the query and output all-to-alls. When the KV heads do not follow
the query heads' split evenly, each host is sent just the KV heads its query heads use
(:func:`kv_shares`; the same count for every host, as DeepSpeed's all-to-all splits heads
evenly), not one KV head per query head. The bytes recorded are those of the tensors sent.
Communication per layer: four all-to-alls (q, k, v, out), each moving ``(W-1)/W`` of the local
tensor.
"""

from __future__ import annotations

import time

import torch

from apb.kernels import attention
from apb.methods.registry import register_method
from apb.methods.base import Method
from apb.methods.cost import HostWork
from apb.model.features import attention_sizes
from apb.parallel import layout


def kv_shares(heads: int, kv_heads: int, world: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """Which KV heads each host is sent, and which of them each of its query heads uses.

    The query heads (padded to ``H' = ceil(H/W) W``) go to hosts in equal runs of ``H'/W``; host
    ``r`` needs the KV heads of its real query heads, ``m`` = the most any host needs, and every
    host gets ``m`` (short lists repeat their last head; padding heads use the first). Returns
    (the ``W*m`` KV heads to send, in host order; per host, for each of its query heads, the
    index of its KV head among the ``m`` it receives).
    """
    group = heads // kv_heads
    share = -(-heads // world)
    need = [sorted({h // group for h in range(r * share, min((r + 1) * share, heads))}) for r in range(world)]
    m = max(len(n) for n in need)
    sent, index = [], []
    for r, n in enumerate(need):
        mine = (n or [0]) + [(n or [0])[-1]] * (m - len(n or [0]))
        sent += mine
        index.append(tuple(mine.index(h // group) if h < heads else 0 for h in range(r * share, (r + 1) * share)))
    return tuple(sent), tuple(index)


def plain_grouping(index: tuple[int, ...] | list[int], share: int, m: int) -> bool:
    """Whether a host's ``share`` query heads read its ``m`` KV heads as the kernel's own GQA
    grouping does (``share / m`` consecutive query heads per KV head), so no local repeat is needed."""
    return share % m == 0 and tuple(index) == tuple(j // (share // m) for j in range(share))


def _local_attention(call: dict, timer: list[float]):
    """The local step; ``call`` holds the current layer's ``scale``, score options (this host's
    heads) and ``kv_index`` (per query head, its KV head among those received; None: the plain
    GQA grouping holds)."""
    def run(q, k, v, *args, **kwargs):
        t0 = time.perf_counter()
        opts = dict(call)
        index = opts.pop("kv_index")
        if index is not None:  # this host's query heads use its KV heads unevenly: one per query head, locally
            k, v = k[:, :, index], v[:, :, index]
        # DeepSpeed hands over (batch, seq, heads, dim); the kernel wants (batch, heads, seq, dim)
        out, _ = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, **opts)
        timer[0] += time.perf_counter() - t0
        return out.transpose(1, 2)

    return run


def _deepspeed_attention(local, group):
    # imported on first use: deepspeed takes seconds to import and probes the accelerator, which
    # every other method (and `import apb.methods`) would otherwise pay for
    import deepspeed.comm as ds_comm
    from deepspeed.sequence.layer import DistributedAttention

    if ds_comm.cdb is None:
        if torch.distributed.get_backend(group) == "gloo":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (about a minute on a
            # fresh machine) that all-to-all never uses; marking it incompatible makes DeepSpeed take
            # its documented fallback, plain torch.distributed.
            import deepspeed.ops
            from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

            deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
        ds_comm.init_distributed(dist_backend=torch.distributed.get_backend(group), auto_mpi_discovery=False,
                                 verbose=False)
    return DistributedAttention(local, group, scatter_idx=2, gather_idx=1)


def _my_heads(opts: dict, rank: int, world: int) -> dict:
    """Score options for the heads this host attends: the all-to-all hands host ``r`` the ``r``-th
    of ``W`` equal runs of heads, so it takes the same run of the per-head sinks."""
    sinks = opts.get("sinks")
    return opts if sinks is None else {**opts, "sinks": sinks.view(world, -1)[rank]}


@register_method("ulysses")
class Ulysses(Method):
    @classmethod
    def cost(cls, n, w, shape, sizes):
        # four all-to-alls (q, k, v, out), each (W-1)/W of a local tensor, all counted at H heads:
        # an upper bound with GQA, where k and v carry KV heads
        b = n / w
        moved = 4 * b * shape.heads * shape.head_dim * shape.bytes_per_param * (w - 1) / w
        return HostWork(b, n * n / 2 / w, b, comm_bytes=moved, steps=4)

    def transfer_bytes(self, local, n_tokens, world, per_tok, passing, model_config, dtype_bytes):
        if world == 1:
            return 0
        heads, kv_heads, head_dim = attention_sizes(model_config)
        share = -(-heads // world)  # query heads are padded to equal shares
        kv_share = kv_heads // world if kv_heads % world == 0 else len(kv_shares(heads, kv_heads, world)[0]) // world
        # q and out, k and v of this host's heads, over the whole padded sequence
        return 2 * -(-n_tokens // world) * world * (share + kv_share) * head_dim * dtype_bytes

    def layout(self, n_tokens, world_size, n_query=0):
        return layout.contiguous(n_tokens, world_size)


    def attention(self, ctx, module, q, k, v, scale):
        world = ctx.comm.size
        if world == 1:
            return attention(q, k, v, causal=True, scale=scale, **ctx.score_opts)[0]
        heads, kv_heads = q.shape[1], k.shape[1]
        pad = -heads % world
        opts = ctx.score_opts
        kv_index = None
        if kv_heads % world != 0 or pad:
            sent, index = _shares(ctx, heads, kv_heads, world, k.device)
            k, v = k[:, sent], v[:, sent]
            kv_index = index[ctx.rank]
        if pad:  # DeepSpeed splits heads evenly: zero heads fill the last share (their outputs are dropped)
            q = torch.cat([q, q.new_zeros(q.shape[0], pad, *q.shape[2:])], 1)
            if opts.get("sinks") is not None:
                opts = {**opts, "sinks": torch.cat([opts["sinks"], opts["sinks"].new_zeros(pad)])}
        if "ulysses" not in ctx.scratch:
            if ctx.comm.staged(q.device) and q.device.type != "cpu":
                raise RuntimeError("ulysses on ranks that share a GPU: DeepSpeed's all-to-all moves CUDA tensors "
                                   "only over NCCL, which refuses two ranks on one GPU (parallel.share_gpus runs over "
                                   "gloo). Give each rank its own GPU, or use another method")
            timer, call = [0.0], {}
            ctx.scratch["ulysses"] = (_deepspeed_attention(_local_attention(call, timer), ctx.comm.group), timer, call)
        dist_attn, timer, call = ctx.scratch["ulysses"]
        call.clear()
        call.update(scale=scale, kv_index=kv_index, **_my_heads(opts, ctx.rank, world))
        t0, local0 = time.perf_counter(), timer[0]
        out = dist_attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0)
        # DeepSpeed does its own four exchanges (q, k, v, output); count each here: (W-1)/W of
        # the tensor leaves each host. The time is what the call took beyond the local attention.
        exchange_s = time.perf_counter() - t0 - (timer[0] - local0)
        for t in (q, k, v, out):
            ctx.comm.record_external("all_to_all", t.numel() * t.element_size() * (world - 1) // world, exchange_s / 4)
        return out.transpose(1, 2)[:, :heads]


def _shares(ctx, heads: int, kv_heads: int, world: int, device) -> tuple[torch.Tensor, list]:
    """:func:`kv_shares` as device indices, once per prompt (not a host-to-device copy per layer);
    a host whose query heads keep the plain GQA grouping gets None (the kernel groups natively)."""
    key = ("ulysses_kv", heads, kv_heads, str(device))
    if key not in ctx.scratch:
        sent, index = kv_shares(heads, kv_heads, world)
        m, share = len(sent) // world, -(-heads // world)
        plain = [plain_grouping(idx, share, m) for idx in index]
        ctx.scratch[key] = (torch.tensor(sent, device=device),
                            [None if p else torch.tensor(idx, device=device) for p, idx in zip(plain, index)])
    return ctx.scratch[key]
