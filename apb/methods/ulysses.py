"""``ulysses``: exact attention by all-to-all from sequence shards to head shards.

Host ``r`` holds contiguous chunk ``r`` (the prompt is right-padded to a multiple of ``W``).
DeepSpeed's :class:`DistributedAttention` all-to-alls Q/K/V so each host holds the whole
sequence for ``H/W`` heads, runs causal attention locally, and all-to-alls the output back.
When the KV heads do not split evenly over ``W`` they are replicated to one per query head
(the GQA grouping is then trivially preserved). When the query heads do not split evenly either,
zero heads are appended up to the next multiple of ``W`` (their outputs are dropped): hosts then
hold ``ceil(H/W)`` or fewer real heads, and the padding adds ``(H'-H)/H`` to every all-to-all,
counted in the bytes recorded. Communication per layer: four all-to-alls
(q, k, v, out), each moving ``(W-1)/W`` of the local tensor.
"""

from __future__ import annotations

import time

import torch

from apb.kernels import attention, repeat_kv
from apb.methods.registry import register_method
from apb.methods.base import Method
from apb.methods.cost import HostWork
from apb.parallel import layout


def _local_attention(call: dict, timer: list[float]):
    """The local step; ``call`` holds the current layer's ``scale`` and score options (this host's heads)."""
    def run(q, k, v, *args, **kwargs):
        t0 = time.perf_counter()
        # DeepSpeed hands over (batch, seq, heads, dim); the kernel wants (batch, heads, seq, dim)
        out, _ = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, **call)
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
        heads = model_config.num_attention_heads
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
        share = -(-heads // world)  # heads are padded to equal shares
        return 4 * -(-n_tokens // world) * world * share * head_dim * dtype_bytes  # q, k, v, out of this host's heads

    def layout(self, n_tokens, world_size, n_query=0):
        return layout.contiguous(n_tokens, world_size)

    def attention(self, ctx, module, q, k, v, scale):
        world = ctx.comm.size
        if world == 1:
            return attention(q, k, v, causal=True, scale=scale, **ctx.score_opts)[0]
        heads, kv_heads = q.shape[1], k.shape[1]
        pad = -heads % world
        opts = ctx.score_opts
        if kv_heads % world != 0 or pad:
            k, v = repeat_kv(k, heads // kv_heads), repeat_kv(v, heads // kv_heads)
        if pad:  # DeepSpeed splits heads evenly: zero heads (scores 0 over zero values) fill the last share
            q, k, v = (torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], 1) for t in (q, k, v))
            if opts.get("sinks") is not None:
                opts = {**opts, "sinks": torch.cat([opts["sinks"], opts["sinks"].new_zeros(pad)])}
        if "ulysses" not in ctx.scratch:
            timer, call = [0.0], {}
            ctx.scratch["ulysses"] = (_deepspeed_attention(_local_attention(call, timer), ctx.comm.group), timer, call)
        dist_attn, timer, call = ctx.scratch["ulysses"]
        call.clear()
        call.update(scale=scale, **_my_heads(opts, ctx.rank, world))
        t0, local0 = time.perf_counter(), timer[0]
        out = dist_attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0)
        # DeepSpeed does its own four exchanges (q, k, v, output); count each here: (W-1)/W of
        # the tensor leaves each host. The time is what the call took beyond the local attention.
        exchange_s = time.perf_counter() - t0 - (timer[0] - local0)
        for t in (q, k, v, out):
            ctx.comm.record_external("all_to_all", t.numel() * t.element_size() * (world - 1) // world, exchange_s / 4)
        return out.transpose(1, 2)[:, :heads]
