"""Compressors: how a host chooses the passing block, the K/V it sends to later hosts.

A compressor scores every token of a context block per KV head; the top ``p`` per head (after
an optional max-pool that keeps neighbours of strong tokens together) form the passing block,
returned in position order. Registered by name:

=================  ===========================================================  ==============
name               score of block token t, per KV head                         needs
=================  ===========================================================  ==============
``query``          mean over query tokens and the GQA group of ``q . k_t``      query Q
``snapkv``         softmax attention of the last ``w`` query tokens, summed     query Q
``retaining_heads`` a per-layer MLP on ``concat(q, k, v)`` before RoPE          weights file
``stride``         every k-th token (a control)                                 nothing
=================  ===========================================================  ==============
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from apb.model.features import qkv_projections, qkv_sizes

_COMPRESSORS: dict[str, type["Compressor"]] = {}


def register_compressor(name: str) -> Callable[[type["Compressor"]], type["Compressor"]]:
    def deco(cls):
        cls.name = name
        _COMPRESSORS[name] = cls
        return cls

    return deco


def compressor_names() -> list[str]:
    return list(_COMPRESSORS)


def build_compressor(name: str, **options) -> "Compressor":
    if name not in _COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; valid compressors: {', '.join(_COMPRESSORS)}")
    return _COMPRESSORS[name](**options)


@dataclass
class ScoreInputs:
    """What a compressor may look at for one block at one layer (batch 1 layouts)."""

    layer: int
    k: torch.Tensor  # (b, kv_heads, t, d), after RoPE
    v: torch.Tensor
    q_query: torch.Tensor | None = None  # (b, heads, n_query, d), after RoPE
    pre_rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (b, t, heads*d), (b, t, kv*d) x2
    scale: float = 1.0


class Compressor:
    name: ClassVar[str] = ""
    needs_query: ClassVar[bool] = False
    needs_pre_rope: ClassVar[bool] = False

    def __init__(self, pool_width: int = 5, **_):
        if pool_width < 1 or pool_width % 2 == 0:
            raise ValueError(f"pool_width={pool_width}: must be a positive odd number (1 disables pooling)")
        self.pool_width = pool_width

    def scores(self, x: ScoreInputs) -> torch.Tensor:
        """(b, kv_heads, t) float32; higher is more important."""
        raise NotImplementedError

    def check_model(self, model) -> None:
        """Raise ``ValueError`` naming the fix if this compressor cannot score the loaded ``model``'s
        blocks (called through ``Method.check_model`` on every host before anything is sent)."""

    def select(self, x: ScoreInputs, p: int) -> torch.Tensor:
        """Indices (b, kv_heads, p) into the block, ascending."""
        t = x.k.shape[2]
        if p >= t:
            return torch.arange(t, device=x.k.device).expand(x.k.shape[0], x.k.shape[1], t)
        raw = self.scores(x).float()
        if self.pool_width == 1:
            return torch.topk(raw, p, dim=-1).indices.sort(dim=-1).values
        pooled = F.max_pool1d(raw, self.pool_width, stride=1, padding=self.pool_width // 2)
        # pooling gives a strong token's neighbours its score; break those ties by the raw score,
        # so the strong token itself is always among the chosen
        by_raw = torch.argsort(raw, dim=-1, descending=True, stable=True)
        by_pooled = torch.argsort(pooled.gather(-1, by_raw), dim=-1, descending=True, stable=True)
        return by_raw.gather(-1, by_pooled[..., :p]).sort(dim=-1).values


def take(kv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (b, h, p) of ``kv`` (b, h, t, d)."""
    return torch.gather(kv, 2, idx[..., None].expand(*idx.shape, kv.shape[-1]))


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(b, heads, s, d) -> (b, kv_heads, group * s, d): each KV head with its query heads."""
    b, h, s, d = q.shape
    return q.reshape(b, kv_heads, (h // kv_heads) * s, d)


def no_query_tokens(name: str) -> ValueError:
    """The refusal of a compressor that scores against the query, for a prompt without one."""
    return ValueError(f"compressor {name!r} scores against the query, but this prompt has no query tokens; "
                      "give a question, or use compressor 'stride' or 'retaining_heads'")


def _need_query(x: ScoreInputs, name: str) -> torch.Tensor:
    if x.q_query is None or x.q_query.shape[2] == 0:
        raise no_query_tokens(name)
    return x.q_query


@register_compressor("query")
class QueryCompressor(Compressor):
    needs_query = True

    def scores(self, x):
        q = _grouped(_need_query(x, self.name).float(), x.k.shape[1])
        return torch.matmul(q, x.k.float().transpose(-1, -2)).mean(dim=2)


@register_compressor("snapkv")
class SnapKVCompressor(Compressor):
    needs_query = True

    def __init__(self, snapkv_window: int = 16, **kw):
        super().__init__(**kw)
        if snapkv_window < 1:
            raise ValueError(f"snapkv_window={snapkv_window}: must be >= 1")
        self.window = snapkv_window

    def scores(self, x):
        q = _need_query(x, self.name)[:, :, -self.window:]
        q = _grouped(q.float(), x.k.shape[1])
        probs = torch.softmax(torch.matmul(q, x.k.float().transpose(-1, -2)) * x.scale, dim=-1)
        return probs.sum(dim=2)


@register_compressor("stride")
class StrideCompressor(Compressor):
    def select(self, x, p):
        t = x.k.shape[2]
        if p >= t:
            return super().select(x, p)
        idx = torch.div(torch.arange(p, device=x.k.device) * t, p, rounding_mode="floor")
        return idx.expand(x.k.shape[0], x.k.shape[1], p)


@register_compressor("retaining_heads")
class RetainingHeads(Compressor):
    """Per layer: ``fc2(silu(fc1(concat(q, k, v))))`` -> one score per KV head.

    The safetensors file holds ``layers.{i}.fc1.weight`` (hidden, heads*d + 2*kv*d),
    ``layers.{i}.fc1.bias``, ``layers.{i}.fc2.weight`` (kv_heads, hidden), ``layers.{i}.fc2.bias``.
    """

    needs_pre_rope = True

    def __init__(self, retaining_heads_path: str | None = None, **kw):
        super().__init__(**kw)
        if not retaining_heads_path:
            raise ValueError("compressor 'retaining_heads' needs method.retaining_heads_path (a .safetensors file)")
        path = Path(retaining_heads_path)
        if not path.is_file():
            raise FileNotFoundError(f"method.retaining_heads_path={str(path)!r} does not exist")
        self.weights = load_file(str(path))
        self.path = path
        self._on: dict[torch.device, dict[str, torch.Tensor]] = {}

    def check_model(self, model) -> None:
        layers = qkv_projections(model)
        total = model.config.get_text_config().num_hidden_layers
        if len(layers) < total:
            missing = sorted(set(range(total)) - set(layers))
            attn = next((m for m in model.modules() if getattr(m, "layer_idx", None) == missing[0]
                         and type(m).__name__.endswith("Attention")), None)
            has = "" if attn is None else " (it projects with " + ", ".join(
                n for n, c in attn.named_children() if isinstance(c, torch.nn.Linear)) + ")"
            raise ValueError(
                f"compressor 'retaining_heads' scores each block on its q/k/v projections before RoPE, and "
                f"{type(model).__name__}'s attention in layer(s) {missing[:8]} has neither q_proj/k_proj/v_proj "
                f"nor a qkv_proj that splits into them{has}; use method.compressor 'query', 'snapkv' or 'stride'")
        for layer, module in sorted(layers.items()):
            key = f"layers.{layer}.fc1.weight"
            if key not in self.weights:
                raise ValueError(f"method.retaining_heads_path={str(self.path)!r} has no weights for layer {layer} "
                                 f"({key}): the file was made for a model with fewer layers")
            sizes = qkv_sizes(module)
            if None not in sizes and self.weights[key].shape[1] != sum(sizes):
                raise ValueError(f"method.retaining_heads_path={str(self.path)!r}: layer {layer} expects "
                                 f"{self.weights[key].shape[1]} input features, the model gives {sum(sizes)} "
                                 f"(q {sizes[0]} + k {sizes[1]} + v {sizes[2]}); the file was made for another model")

    def _weights(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._on:  # moved once per device, not once per layer call
            self._on[device] = {k: t.to(device=device, dtype=torch.float32) for k, t in self.weights.items()}
        return self._on[device]

    def scores(self, x):
        if x.pre_rope is None:
            raise RuntimeError("retaining_heads needs pre-RoPE projections; the runtime did not capture them")
        w = self._weights(x.k.device)
        key = f"layers.{x.layer}.fc1.weight"
        if key not in w:
            raise ValueError(f"{self.path} has no weights for layer {x.layer} ({key})")
        feats = torch.cat([t.float() for t in x.pre_rope], dim=-1)  # (b, t, in)
        fc1 = w[key]
        if fc1.shape[1] != feats.shape[-1]:
            raise ValueError(f"{self.path}: layer {x.layer} expects {fc1.shape[1]} input features, the model gives "
                             f"{feats.shape[-1]} (heads*d + 2*kv_heads*d); the file was made for another model")
        h = F.silu(F.linear(feats, fc1, w[f"layers.{x.layer}.fc1.bias"]))
        out = F.linear(h, w[f"layers.{x.layer}.fc2.weight"], w[f"layers.{x.layer}.fc2.bias"])  # (b, t, kv)
        return out.transpose(1, 2)


def random_retaining_heads(path: str | Path, model_config, hidden: int = 64, seed: int = 0) -> Path:
    """Write a randomly initialised retaining-heads file for ``model_config`` (tests, smoke runs)."""
    g = torch.Generator().manual_seed(seed)
    heads, kv = model_config.num_attention_heads, model_config.num_key_value_heads
    d = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    n_in = heads * d + 2 * kv * d
    tensors = {}
    for i in range(model_config.num_hidden_layers):
        tensors[f"layers.{i}.fc1.weight"] = torch.randn(hidden, n_in, generator=g) / n_in ** 0.5
        tensors[f"layers.{i}.fc1.bias"] = torch.zeros(hidden)
        tensors[f"layers.{i}.fc2.weight"] = torch.randn(kv, hidden, generator=g) / hidden ** 0.5
        tensors[f"layers.{i}.fc2.bias"] = torch.zeros(kv)
    save_file(tensors, str(path))
    return Path(path)
