"""An analytical cost model of prefill: FLOPs, memory and communication per method.

Time of one prefill = sum over layers of the slowest host's compute, plus the communication
that is not hidden behind compute, plus a fixed per-layer overhead for distributed methods.
Compute = linear FLOPs / (peak x ``LINEAR_EFF``) + attention FLOPs / (peak x ``ATTN_EFF``).
A host runs out of memory (OOM) when weights + its KV cache + transient activations exceed the
device memory. The constants below are few and shared by every method:

==========================  =======  =================================================================
constant                    value    meaning
==========================  =======  =================================================================
``LINEAR_EFF``              0.75     fraction of peak bf16 FLOP/s reached by the GEMMs
``ATTN_EFF``                0.70     fraction of peak reached by flash attention
``COMM_EFF``                0.80     fraction of link bandwidth reached by collectives
``LAYER_OVERHEAD_S``        3e-4     per layer and distributed step: launches, syncs, merges
``ACT_FACTOR``              6        transient activations: vectors of (hidden + intermediate) per token
``MEM_RESERVE``             0.92     usable fraction of device memory
==========================  =======  =================================================================

What a method costs one host (tokens, attended pairs, cached tokens, bytes sent) is the method's
own formula, :meth:`apb.methods.base.Method.cost`, with its default sizes from the same rule its
``plan()`` uses; this module adds the device and the model: time, memory and the reference table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from apb.methods import build_method, method_class
from apb.methods.cost import HostWork, Sizes, attention_flops, single_device
from apb.model.features import attention_sizes, sliding_windows
from apb.model.loading import skeleton
from apb.model.routing import routers
from apb.runtime.memory import kv_bytes_per_token

LINEAR_EFF = 0.75
ATTN_EFF = 0.70
COMM_EFF = 0.80
LAYER_OVERHEAD_S = 3e-4
ACT_FACTOR = 6
MEM_RESERVE = 0.92


@dataclass(frozen=True)
class Device:
    name: str
    bf16_flops: float  # dense peak, FLOP/s
    hbm_bw: float  # bytes/s
    memory: float  # bytes
    intra_bw: float  # bytes/s per GPU, one direction, inside a node (NVLink)
    inter_bw: float  # bytes/s per GPU across nodes (InfiniBand)
    gpus_per_node: int = 8


GB = 1e9
DEVICES = {
    "A800": Device("A800-80GB", 312e12, 2.0e12, 80 * GB, 200 * GB, 25 * GB),
    "H100": Device("H100-SXM-80GB", 989e12, 3.35e12, 80 * GB, 450 * GB, 50 * GB),
    "H200": Device("H200-SXM-141GB", 989e12, 4.8e12, 141 * GB, 450 * GB, 50 * GB),
}


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    bytes_per_param: int = 2
    # seconds per linear and per attention FLOP on the device costed (any pair in that ratio):
    # where a formula weighs two hosts, one with more tokens and one with more pairs, the slower
    # is the one with more seconds (apb.methods.cost.slowest); FLOPs alone by default
    rates: tuple[float, float] = (1.0, 1.0)
    # the window of each sliding layer (apb.methods.cost.attention_flops); global layers not listed
    windows: tuple[int, ...] = ()
    # read from the model's own modules (:func:`layer_weights`) where the formula above does not
    # hold (experts, MLA): multiply-adds per token through all layers, and all the weights
    per_token_macs: float | None = None
    n_params: float | None = None
    # what one token keeps in one layer's cache, in elements, where it is not K and V of
    # ``kv_heads x head_dim`` (an MLA layer keeps its latent: apb.runtime.memory.kv_bytes_per_token)
    cached_width: int | None = None

    @classmethod
    def from_config(cls, config, name: str = "bench") -> "ModelShape":
        """The shape of a transformers config. MLA's heads count at the mean of their query/key
        and value widths (the K and V a method sends per token, and QK plus PV FLOPs per pair, come
        out right), and its cache at its latent; the linear work and the weights are read from a
        skeleton of the model (:func:`layer_weights`)."""
        heads, kv_heads, head_dim = attention_sizes(config)
        if getattr(config, "kv_lora_rank", None) and getattr(config, "v_head_dim", None):
            head_dim = (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) / 2
        macs, n_params = layer_weights(config) or (None, None)
        latent = kv_bytes_per_token(config, 1) if getattr(config, "kv_lora_rank", None) else None
        return cls(name, config.num_hidden_layers, config.hidden_size, heads, kv_heads, head_dim, config.intermediate_size, config.vocab_size,
                   windows=sliding_windows(config), per_token_macs=macs, n_params=n_params, cached_width=latent)

    @property
    def params(self) -> float:
        if self.n_params is not None:
            return self.n_params
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp) + 2 * self.vocab * self.hidden

    def linear_flops(self, tokens: float) -> float:
        """All layers' projections and MLP for ``tokens`` tokens (2 FLOPs per multiply-add; a token
        runs through its routed experts only)."""
        if self.per_token_macs is not None:
            return 2.0 * tokens * self.per_token_macs
        per_layer = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads) + 3 * self.hidden * self.intermediate
        return 2.0 * tokens * per_layer * self.layers

    def attn_flops_per_pair(self) -> float:
        """One (query, key) pair, one layer, all heads: QK^T and PV."""
        return 4.0 * self.heads * self.head_dim

    def kv_bytes(self, tokens: float) -> float:
        width = 2 * self.kv_heads * self.head_dim if self.cached_width is None else self.cached_width
        return tokens * self.layers * width * self.bytes_per_param

    def act_bytes(self, tokens: float) -> float:
        return tokens * ACT_FACTOR * (self.hidden + self.intermediate) * self.bytes_per_param


_LAYER_WEIGHTS: dict[str, tuple[float, float] | None] = {}


def layer_weights(config) -> tuple[float, float] | None:
    """:func:`read_layer_weights`, once per config (a bench asks for every row)."""
    key = config.to_json_string() if hasattr(config, "to_json_string") else None
    if key is None:  # not a transformers config: no skeleton either
        return read_layer_weights(config)
    if key not in _LAYER_WEIGHTS:
        _LAYER_WEIGHTS[key] = read_layer_weights(config)
    return _LAYER_WEIGHTS[key]


def read_layer_weights(config) -> tuple[float, float] | None:
    """(multiply-adds per token through every decoder layer, all the model's weights) read from
    a skeleton of the model without values: each matrix of a layer is one multiply-add per entry
    and token, the experts' stacked weights ``(experts, out, in)`` count ``top_k`` of them (every
    family with experts in transformers 5 stacks them so). None where the skeleton cannot be
    built (the formula of :class:`ModelShape` stands)."""
    model = skeleton(config)
    if model is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    top_k = {i: getattr(r, "top_k", None) for i, r in routers(model).items()}
    macs = 0.0
    for name, module in model.named_modules():
        m = _DECODER_LAYER.search(name)
        if not m:
            continue
        k = top_k.get(int(m.group(1))) or getattr(text, "num_experts_per_tok", 1)
        for pname, p in module.named_parameters():
            if pname.endswith("bias"):  # gpt-oss stacks its experts' biases as (experts, out): no matrix
                continue
            if p.dim() == 3:  # (experts, out, in): a token runs k of them
                macs += k * p[0].numel()
            elif p.dim() == 2:
                macs += p.numel()
    return macs, float(sum(p.numel() for p in model.parameters()))


_DECODER_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")


MODELS = {
    "llama-3.1-8b": ModelShape("Llama-3.1-8B", 32, 4096, 32, 8, 128, 14336, 128256),
    "qwen2.5-14b": ModelShape("Qwen2.5-14B", 48, 5120, 40, 8, 128, 13824, 152064),
    "yi-34b": ModelShape("Yi-34B", 60, 7168, 56, 8, 128, 20480, 64000),
}


def host_work(method: str, n: float, w: int, m: ModelShape, sizes: Sizes = Sizes()) -> HostWork:
    """The slowest host's work for ``method`` prefilling ``n`` tokens over ``w`` hosts."""
    cls = method_class(method)
    if w == 1:  # one host runs the whole prompt as the single-device reference, whatever the method
        return single_device(n)
    return cls.cost(n, w, m, sizes)


def hosts(method: str, w: int) -> int:
    """The hosts ``method`` uses out of ``w`` (``full`` runs on one)."""
    return 1 if method_class(method).one_host else w


@dataclass
class Prediction:
    method: str
    n: int
    w: int
    seconds: float | None  # None: out of memory
    compute_s: float = 0.0
    comm_s: float = 0.0
    memory_gb: float = 0.0
    notes: list[str] = field(default_factory=list)


def predict(method: str, n: int, w: int, model: ModelShape, device: Device, sizes: Sizes = Sizes()) -> Prediction:
    work = host_work(method, n, w, replace(model, rates=(1 / LINEAR_EFF, 1 / ATTN_EFF)), sizes)
    weights = model.params * model.bytes_per_param
    memory = weights + model.kv_bytes(work.cached) + model.act_bytes(work.tokens)
    if memory > device.memory * MEM_RESERVE:
        return Prediction(method, n, w, None, memory_gb=memory / GB, notes=["out of memory"])
    linear = model.linear_flops(work.tokens) / (device.bf16_flops * LINEAR_EFF)
    attn = attention_flops(work, model, n) / (device.bf16_flops * ATTN_EFF)
    bw = device.intra_bw if w <= device.gpus_per_node else device.inter_bw
    hidden = model.layers * work.overlap_bytes / (bw * COMM_EFF)
    comm = model.layers * work.comm_bytes / (bw * COMM_EFF) + max(0.0, hidden - attn)
    overhead = model.layers * work.steps * LAYER_OVERHEAD_S
    total = linear + attn + comm + overhead
    return Prediction(method, n, w, total, compute_s=linear + attn, comm_s=comm + overhead, memory_gb=memory / GB)


# The APB paper's prefill table (Llama-3.1-8B, 8 x A800, seconds; None = OOM). Its Ring baseline
# behaves as the plain (non-zigzag) ring, and its APB runs as a passing block capped at 2K tokens
# (the 128K setting's block/8); both are assumptions fitted to the table, stated here. Its hosts
# each compute their own anchor (no share_anchor: the paper's APB, and its Star Attention).
REFERENCE = {
    "name": "apb-paper",
    "model": "llama-3.1-8b",
    "device": "A800",
    "world_size": 8,
    "sizes": Sizes(passing_cap=2048, ring_balanced=False, share_anchor=False),
    "lengths": [32768, 65536, 131072, 262144, 524288, 1048576],
    "published": {
        "full": [3.46, 9.51, 30.01, None, None, None],
        "ring": [0.72, 2.00, 6.34, 21.80, 81.62, None],
        "star": [0.67, 1.43, 3.50, 9.63, 30.43, None],
        "apb": [0.49, 1.09, 2.79, 5.53, 13.39, 37.6],
    },
}


def compare_reference(tolerance: float = 0.30) -> list[dict]:
    """Predicted vs published for each cell of the reference table."""
    ref = REFERENCE
    model, device = MODELS[ref["model"]], DEVICES[ref["device"]]
    rows = []
    for method, published in ref["published"].items():
        w = hosts(method, ref["world_size"])
        for n, pub in zip(ref["lengths"], published):
            pred = predict(method, n, w, model, device, ref["sizes"]).seconds
            if pub is None or pred is None:
                ratio = None
                hit = pub is None and pred is None
            else:
                ratio = pred / pub
                hit = abs(ratio - 1) <= tolerance
            rows.append({"method": method, "length": n, "world_size": w, "published_s": pub, "predicted_s": pred,
                         "ratio": ratio, "within_tolerance": hit})
    return rows


def scenario(methods: list[str], lengths: list[int], world_sizes: list[int], model: str, device: str,
             sizes: Sizes = Sizes(), method_config=None) -> list[dict]:
    """Predictions for runs no one here can make (e.g. 1M tokens on 16-64 H100s); with
    ``method_config`` (an :class:`apb.config.MethodConfig`), each method at its sizes (anchor,
    passing, exact layers, a variant's own), else at its defaults."""
    m, d = MODELS[model], DEVICES[device]
    out = []
    for w in world_sizes:
        for n in lengths:
            for method in methods:
                own = sizes if method_config is None else sizes.with_method(build_method(method, method_config).config)
                p = predict(method, n, hosts(method, w), m, d, own)
                out.append({"method": method, "length": n, "world_size": p.w, "device": d.name, "model": m.name,
                            "predicted_s": p.seconds, "compute_s": p.compute_s, "comm_s": p.comm_s,
                            "memory_gb": round(p.memory_gb, 1), "oom": p.seconds is None})
    return out
