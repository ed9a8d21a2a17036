"""How much memory one document needs on each host, estimated on the driver before it runs.

An estimate, not a measurement: it counts the tensors the runtime keeps and the largest ones it
makes for a moment, from the model's config and the method's layout, so a document that cannot
fit is refused with its figures before any worker sees it (and ``apb run --dry-run`` prints the
figures for a whole file). Per host:

``weights``
    every parameter of the checkpoint, in the run's dtype (each host holds the whole model);
``kv``
    the K/V this host keeps for decoding, every layer (the positions it caches; a sliding layer
    at most the last ``n_query + window - 1``);
``activations``
    one layer's working set for the tokens it holds: the hidden state and residual, the
    projected Q/K/V and the attention output, and the MLP's gate and up projections;
``transfer``
    what arrives from other hosts within one layer: ring's K/V of a peer's chunks (two buffers
    in flight), apb's and spava's gathered passing blocks, the all-to-all buffers of Ulysses
    (the whole sequence for this host's heads), a sliding layer's halo;
``decode``
    on the decode host only: with ``decode.mode: gather``, the gathered cache once, received
    straight into transformers' layout with room for the answer (each layer the positions
    transformers' cache keeps of it: a sliding layer's last ``window - 1``), plus the staging
    buffer each run of positions is received through (counted as a whole host's share, a bound);
    with ``distributed``, this host's own cache part copied once into a buffer with room for the
    answer, plus the new tokens' K/V.

What it does not count: the allocator's fragmentation and the framework's own workspace (CUDA
context, NCCL buffers: leave a margin), and attention score matrices, which the fused kernels
never materialise (the CPU ``naive`` fallback bounds them by row chunks).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from apb.model.features import attention_sizes, sliding_windows
from apb.runtime.cache import decode_keeps

GIB = 1 << 30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class HostMemory:
    rank: int
    weights: int
    kv: int
    activations: int
    transfer: int
    decode: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.activations + self.transfer + self.decode

    def as_dict(self) -> dict:
        return asdict(self) | {"total": self.total}


def parameter_count(model_path: str | Path) -> int:
    """Elements in the checkpoint's safetensors files (read from their headers, not loaded)."""
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {model_path}: cannot count the model's parameters")
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def _text_config(model_config: Any) -> Any:
    return model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config


def kv_bytes_per_token(model_config: Any, dtype_bytes: int) -> int:
    """Bytes of K and V one token keeps in one layer (an MLA layer keeps its latent pair)."""
    cfg = _text_config(model_config)
    if getattr(cfg, "kv_lora_rank", None):
        return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes
    _, kv_heads, head_dim = attention_sizes(cfg)
    return 2 * kv_heads * head_dim * dtype_bytes


def _layer_widths(model_config: Any) -> tuple[int, int, int, int]:
    """(hidden, q/k/v/out width per token, MLP width per token, largest sliding window or 0)."""
    cfg = _text_config(model_config)
    heads, kv_heads, head_dim = attention_sizes(cfg)
    attn = (2 * heads + 2 * kv_heads) * head_dim  # q, out, k, v
    inter = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
    experts = getattr(cfg, "num_experts_per_tok", None) or 1  # a token's routed experts run at once
    window = 0
    types = getattr(cfg, "layer_types", None) or ()
    if getattr(cfg, "sliding_window", None) and (not types or "sliding_attention" in types):
        window = int(cfg.sliding_window)
    return cfg.hidden_size, attn, 2 * inter * experts, window


def estimate(method, model_config: Any, n_params: int, n_tokens: int, n_query: int, world_size: int,
             dtype: str, decode_mode: str, max_new_tokens: int, plan: Any = None) -> list[HostMemory]:
    """Per host, the memory one prompt of ``n_tokens`` (its last ``n_query`` the query) needs."""
    b = _DTYPE_BYTES[dtype]
    cfg = _text_config(model_config)
    layers = cfg.num_hidden_layers
    per_tok = kv_bytes_per_token(model_config, b)
    hidden, attn, mlp, window = _layer_widths(model_config)
    slices = method.layout(n_tokens, world_size, n_query)
    if plan is None:
        plan = method.plan(n_tokens, world_size, n_query, layers)
    passing = max(getattr(plan, "passing", ()) or (0,))
    windows = sliding_windows(model_config)[:layers]
    hosts = []
    for s in slices:
        local = s.size
        cached = int(s.valid.sum())
        if method.query_phase and s.rank == 0:
            cached += n_query  # the query phase appends the query's K/V on host 0
        # a sliding layer keeps at most the positions a later token sees (AttnContext.window_tail)
        held = (cached * (layers - len(windows)) + sum(min(cached, n_query + w - 1) for w in windows)) * per_tok
        act = local * (3 * hidden + attn + mlp) * b
        transfer = method.transfer_bytes(local, n_tokens, world_size, per_tok, passing, cfg, b)
        if window and window < n_tokens:
            transfer += min(window, n_tokens) * 2 * per_tok  # a halo per chunk (at most two chunks)
        decode = 0
        if s.rank == 0:
            new = max_new_tokens * layers * per_tok
            # gather: the cache received straight into transformers' layout with room for the
            # answer, each layer the positions transformers keeps (a sliding layer's window),
            # through one staging buffer of a run (bounded here by a host's share); distributed: this
            # host's share copied once into a buffer with room for the answer (CacheAttnContext)
            if decode_mode == "gather":
                keeps = decode_keeps(model_config, n_tokens)[:layers]
                kept = sum(n_tokens - first for first in keeps) + (layers - len(keeps)) * n_tokens
                share = max((int(x.valid.sum()) for x in slices if x.rank != s.rank), default=0)
                decode = kept * per_tok + new + share * layers * per_tok
            else:
                decode = held + new
        hosts.append(HostMemory(s.rank, n_params * b, held, act, transfer, decode))
    return hosts


def device_budget(device: str, world_size: int, launcher: str, override_gb: float | None,
                  share_gpus: bool = False) -> int | None:
    """Bytes one host may use: ``parallel.memory_gb`` if set; else a CUDA device's total memory
    (shared by the ranks on it when ``share_gpus`` puts more local ranks than GPUs), or for CPU
    workers this machine's available memory shared by the local processes; None when the driver
    cannot know (Ray or torchrun hosts elsewhere, no CUDA here for a CUDA run)."""
    if override_gb is not None:
        return int(override_gb * GIB)
    if device == "cuda" or (device == "auto" and _cuda_available()):
        if not _cuda_available():
            return None
        # imported on use: only CUDA runs need torch.cuda, and the driver may have no GPU
        import torch

        total = int(torch.cuda.get_device_properties(0).total_memory)
        # ranks on this node: all of them for local workers; torchrun says how many it started here
        local = world_size if launcher == "local" else int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        per_gpu = -(-local // torch.cuda.device_count()) if share_gpus else 1
        return total // per_gpu
    if launcher != "local":
        return None
    available = _available_ram()
    return None if available is None else available // world_size


def _cuda_available() -> bool:
    # imported on use: a budget for CPU workers must not need torch.cuda
    import torch

    return torch.cuda.is_available()


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def describe(hosts: list[HostMemory]) -> str:
    """The largest host's figures, for an error record or a dry-run line."""
    worst = max(hosts, key=lambda h: h.total)
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in worst.as_dict().items() if k not in ("rank", "total"))
    return f"host {worst.rank} needs about {worst.total / GIB:.2f} GiB ({parts} GiB)"
