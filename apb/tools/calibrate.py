"""This device's two rates, measured: what ``apb bench``'s ideal speedups are computed with.

A method's cost formula (:meth:`apb.methods.base.Method.cost`) counts the slowest host's work in
two kinds: attention (query-key pairs, ``4 x heads x head_dim`` FLOPs each) and the per-token
rest (projections, MLP, norms, RoPE; counted as the model's linear FLOPs). The two do not run at
one rate (here, at bench-attn's hidden size of 256 in float32, the per-token work is 1.7x slower
per FLOP than the attention kernel; at SmolLM2's in bfloat16 it is 1.5x faster), so an ideal that
counts every FLOP at one rate misjudges what cutting attention gains. Each rate is measured
here once, on this process, with one thread (as each bench worker has) and in the bench's dtype:

* attention: the project's own kernel on one non-causal call of :data:`ROWS` queries over
  :data:`KEYS` keys with the model's heads, KV heads and head size. Non-causal, because the
  ideal counts every visible pair at the kernel's best rate; what a causal or a small call costs
  beyond that is the method's inefficiency, and shows in its efficiency.
* the rest: the model's own forward with an attention step that returns zeros (no attention
  work, everything else as in a prefill), at two lengths (chosen so the longer holds about
  :data:`TARGET_GFLOP` of linear work); the difference in time over the difference in linear
  FLOPs is the rate, free of the fixed cost of a call.

Each time is the fastest of a few runs (the ideal is each kind of work at its best rate here;
noise on a shared machine only ever slows a run down).

Neither rate is fitted to a bench row: a method's measured time does not enter its own ideal.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass

import torch

from apb.kernels import attention
from apb.runtime import measure
from apb.tools import simulate as costmodel

ROWS, KEYS = 2048, 4096  # one of the calls ring and apb make at 32K over 8 hosts
TARGET_GFLOP = 20.0  # linear work of the rest's longer forward: well above a call's fixed cost, under a second
MIN_TOKENS, MAX_TOKENS = 256, 8192
#: on a GPU the CPU's sizes are over in microseconds, where launches, not work, set the time
#: (seen on an H200: 64 and 256 tokens of the rest took the same time): 16x the attention call,
#: 100x the rest's work, up to 8x the tokens
GPU_SCALE = dict(rows=4, keys=4, target=100.0, max_tokens=8)


@dataclass(frozen=True)
class Rates:
    """Seconds per GFLOP of each kind of work on this device, one thread."""

    attn_s_per_gflop: float
    linear_s_per_gflop: float
    dtype: str
    device: str = "cpu"

    def seconds(self, attn_gflop: float, linear_gflop: float) -> float:
        return attn_gflop * self.attn_s_per_gflop + linear_gflop * self.linear_s_per_gflop

    def to_dict(self) -> dict:
        return asdict(self)


class _NoAttention:
    """An ``apb_ctx`` whose attention step costs nothing: zeros of the output's shape."""

    @staticmethod
    def step(module, query, key, value, scale, **_):
        return query.new_zeros(*query.shape[:3], value.shape[-1])


def best_seconds(fn, repeats: int, device: torch.device) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` after one warm-up, each clock read with
    ``device`` idle (noise on a shared machine only ever slows a call down)."""
    fn()  # warm-up: first-call allocations
    times = []
    for _ in range(repeats):
        measure.sync(device)  # a GPU's clock reads when its queued work is done
        t0 = time.perf_counter()
        fn()
        measure.sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def rest_lengths(shape: costmodel.ModelShape, target_gflop: float = TARGET_GFLOP,
                 max_positions: int | None = None, max_tokens: int = MAX_TOKENS) -> tuple[int, int]:
    """The rest's two lengths: the longer holds about ``target_gflop`` of linear work (within
    [MIN_TOKENS, max_tokens] and the model's positions, a multiple of 64), the shorter a quarter."""
    per_token = shape.linear_flops(1) / 1e9
    top = min(max_tokens, max_positions or max_tokens)
    long = int(min(top, max(MIN_TOKENS, target_gflop / per_token)) // 64 * 64)
    if long < 64:
        raise ValueError(f"the model has {max_positions} positions: too few to measure its per-token rate")
    return long // 4, long


@torch.no_grad()
def measure_rates(model, repeats: int = 5, rows: int | None = None, keys: int | None = None,
                  lengths: tuple[int, int] | None = None) -> Rates:
    """Both rates for ``model`` (loaded with the ``apb`` attention, in the bench's dtype, on the
    device the bench's workers use); sizes unset are this module's, scaled up on a GPU."""
    shape = costmodel.ModelShape.from_config(model.config)
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    up = GPU_SCALE if device.type == "cuda" else dict(rows=1, keys=1, target=1.0, max_tokens=1)
    rows, keys = rows or ROWS * up["rows"], keys or KEYS * up["keys"]
    lengths = lengths or rest_lengths(shape, TARGET_GFLOP * up["target"], max_tokens=MAX_TOKENS * up["max_tokens"],
                                      max_positions=getattr(model.config, "max_position_embeddings", None))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.collect()
    try:
        q = torch.randn(1, shape.heads, rows, shape.head_dim, dtype=dtype, device=device)
        k, v = (torch.randn(1, shape.kv_heads, keys, shape.head_dim, dtype=dtype, device=device) for _ in range(2))
        attn_s = best_seconds(lambda: attention(q, k, v, causal=False), repeats, device)
        attn_gflop = rows * keys * shape.attn_flops_per_pair() / 1e9

        short, long = lengths
        if not 0 < short < long:
            raise ValueError(f"calibration lengths must grow: got {lengths}")
        ids = torch.randint(0, shape.vocab, (1, long), generator=torch.Generator().manual_seed(0)).to(device)

        def forward(n: int):
            model(input_ids=ids[:, :n], position_ids=torch.arange(n, device=device)[None], use_cache=False,
                  logits_to_keep=1, apb_ctx=_NoAttention())

        rest = [best_seconds(lambda n=n: forward(n), repeats, device) for n in lengths]
        linear_gflop = (shape.linear_flops(long) - shape.linear_flops(short)) / 1e9
    finally:
        torch.set_num_threads(threads)
    if not rest[1] > rest[0]:
        raise RuntimeError(f"the per-token rate could not be measured: {long} tokens took {rest[1]:.4f} s, "
                           f"{short} took {rest[0]:.4f} s (the machine is too busy?)")
    return Rates(attn_s / attn_gflop, (rest[1] - rest[0]) / linear_gflop, str(dtype).removeprefix("torch."),
                 device.type)
