"""``apb verify``: run methods on real worker processes and compare with plain Hugging Face.

The reference is independent of everything in this project: the same checkpoint loaded in
float32 with transformers' own ``eager`` attention, one forward pass over the whole prompt
(last-token logits, KV cache) and ``generate`` for the greedy continuation. Each method runs through the
worker group (W processes, gloo on CPU): prefill, cache gather, decode on rank 0.

:func:`judge` decides a row. Non-finite logits fail any row. An exact method must match the
float32 reference within :func:`float32_limit` (logits, each layer's K and V: an absolute part and
a part relative to the values' size) and choose the same greedy tokens;
in bfloat16 and float16, where no two kernels round alike, it is held to :class:`HalfRule`: a
bounded multiple of the error transformers' own eager attention makes in that dtype. An
approximate one (star, apb, spava) is reported with its top-1 token agreement and the KL
divergence of its last-token distribution from the reference's, and is held to :class:`Gates`
only when the user gives them (``--max-logit-diff``, ``--min-token-agreement``).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, DynamicCache

from apb.config import Config
from apb.methods import build_method, check_method_name, method_names
from apb.model import routing as routing_mod
from apb.model.catalog import resolve_model
from apb.model.features import check_supported, kv_sources
from apb.model.hf_bridge import output_cache, with_cache
from apb.model.loading import check_attention_interface, load_model
from apb.parallel.comm import Phase
from apb.runtime.cache import KVCache
from apb.runtime.decode import Sampling
from apb.runtime.worker import PromptRequest

#: float32: the absolute part of the difference allowed in the last-token logits and in each
#: layer's K and V (:func:`float32_limit` adds a part relative to the values' size)
TOLERANCE = {"float32": 1e-4}
#: float32: the relative part, a share of the largest magnitude of the reference tensor compared
#: (the logits, or one layer's K or V). Rounding differences between two correct kernels grow with
#: the values: on the pretrained Gemma 3 270M a layer's keys reach 98 and full at W=1 differs from
#: eager by 3.5e-4 there (2.7e-6 of the layer's norm), where a model with keys near 1 stays under
#: 1e-4. 3e-5 is about 250 float32 steps of the largest value; a wrong mask moves the values it
#: touches by a large fraction of themselves (docs/results.md, "Real Gemma 3").
RELATIVE = {"float32": 3e-5}


def float32_limit(want: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
    """The largest difference an exact row may have from ``want``: ``TOLERANCE + RELATIVE x
    max|want|``. For a stack of layers ``(layers, ...)`` one limit per layer; for a vector (the
    logits) one number."""
    size = want.float().abs()
    size = size.flatten(1).amax(1) if size.dim() > 1 else size.max()
    return TOLERANCE[dtype] + RELATIVE[dtype] * size


@dataclass(frozen=True)
class HalfRule:
    """How an exact row is judged in bfloat16 or float16, where no two kernels round alike: a
    greedy continuation parts at the first near-tie, and absolute differences grow with the values
    (a bfloat16 logit of 20 has a step of 0.125). So the method is compared with the float32
    eager reference (the truth), and allowed a bounded multiple of the error that transformers'
    own attention makes *in the same dtype* against that truth (the floor, measured on the same
    prompt: the larger of eager's and sdpa's, :class:`Floor`):

    * each layer's K and V: ``||m - truth|| / ||truth||`` at most ``layer_factor`` x the floor's
      (or ``layer_min``);
    * the last-token distribution: KL(truth || m) at most ``kl_factor`` x the floor's (or ``kl_min``).

    Calibrated on SmolLM2-135M, 700 tokens, bfloat16 (``docs/results.md``, "verify in bfloat16"):
    full, ring, ulysses and apb:uncompressed at W=3 stay within 1.2x of the floor per layer and 1.5x
    in KL; letting each query see the next key, hiding key 0, shrinking the window to 3/4 of the
    prompt, or hiding key 0 from the last query alone, are at least 5.9x per layer or 9x in KL.
    Greedy tokens are reported, not judged.

    A model that routes tokens to experts makes a discrete choice per token and layer, and a
    rounding step can flip a near-tied one (:mod:`apb.model.routing`): that token's K/V then differ
    from the next layer on, in eager's 16-bit run or in the method's, and one such token fails or
    loosens the whole layer's measure. So for such a model every host reports the experts its
    forwards chose for each token, and both measures leave out, from the layer after, each token
    that took other experts than float32's: in eager's run and in the method's (by any of its
    copies). A token's first such choice in the method's run must be a near-tie, its float32
    margin within ``tie_factor`` x the dtype's rounding of the router scores, or one transformers'
    own 16-bit runs made too; any other fails the row (its input moved by more than rounding). A flip of the token
    the last logits belong to leaves the KL reported, not judged."""

    layer_factor: float = 2.0
    layer_min: float = 0.01
    kl_factor: float = 4.0
    kl_min: float = 5e-3
    tie_factor: float = 4.0


HALF_RULE = HalfRule()
HALF_DTYPES = ("bfloat16", "float16")


def layer_rel_diff(truth: Reference, keys: torch.Tensor | None, values: torch.Tensor | None,
                   keep: torch.Tensor | None = None) -> float:
    """max over layers and K/V of ``||m - truth|| / ||truth||`` (inf when the shapes differ); with
    ``keep`` ``(layers, n)`` bool, over each layer's kept tokens only."""
    if keys is None or keys.shape != truth.keys.shape:
        return math.inf
    worst = 0.0
    for mine, want in ((keys, truth.keys), (values, truth.values)):
        d2 = (mine.float() - want.float()).pow(2).sum(-1).sum(1)  # (layers, n)
        w2 = want.float().pow(2).sum(-1).sum(1)
        if keep is not None:
            d2, w2 = d2 * keep, w2 * keep
        worst = max(worst, float((d2.sum(1).sqrt() / w2.sum(1).sqrt().clamp_min(1e-12)).max()))
    return worst


def _after(flips: dict[int, torch.Tensor], layers: int, n: int) -> torch.Tensor:
    """``(layers, n)``: True from the layer after a token's first flip (router layer -> flipped tokens)."""
    out = torch.zeros(layers, n, dtype=torch.bool)
    for layer, flipped in flips.items():
        out[layer + 1:] |= flipped
    return out


@dataclass(frozen=True)
class Floor:
    """What transformers' own attention in a 16-bit dtype differs from the float32 truth by, on one
    prompt: the larger of its eager and sdpa implementations' errors (:func:`half_models`). One
    16-bit run's last-token KL is one sample of how rounding falls, and varies about 10x between
    prompts: on the pretrained Gemma 3 270M at 1,500 tokens eager's was 2.6e-3 where sdpa's, the
    implementation transformers runs by default, was 3.8e-2, so a floor of eager alone failed
    sdpa itself (``docs/results.md``, "Real Gemma 3").

    For a model with experts (``flips`` set): per router layer, which tokens either run sent to
    other experts than float32 did (``flips``), True from the layer after in ``flipped``
    ``(layers, n)``, and which tokens' float32 choice was near a tie (``ties``)."""

    layer_rel: float
    kl: float
    flips: dict | None = field(default=None, repr=False)
    flipped: torch.Tensor | None = field(default=None, repr=False)
    ties: dict | None = field(default=None, repr=False)

    @classmethod
    def measure(cls, truth: Reference, half: "Reference | list[Reference]", rule: "HalfRule | None" = None) -> "Floor":
        """The floor of one 16-bit run, or the widest of several (each measure's largest; the
        experts' flips and near-ties of any)."""
        floors = [cls._measure_one(truth, h, rule) for h in (half if isinstance(half, (list, tuple)) else [half])]
        if len(floors) == 1:
            return floors[0]
        kls = [f.kl for f in floors if math.isfinite(f.kl)]
        if floors[0].flips is None:
            return cls(max(f.layer_rel for f in floors), max(kls, default=math.nan))
        # with experts: a token any run flipped is left out of every run's K/V measure
        flipped = torch.stack([f.flipped for f in floors]).any(0)
        none = torch.zeros(truth.keys.shape[2], dtype=torch.bool)

        def unite(maps: list[dict]) -> dict:
            return {k: torch.stack([m.get(k, none) for m in maps]).any(0) for k in set().union(*maps)}

        return cls(max(layer_rel_diff(truth, h.keys, h.values, ~flipped) for h in half), max(kls, default=math.nan),
                   unite([f.flips for f in floors]), flipped, unite([f.ties for f in floors]))

    @classmethod
    def _measure_one(cls, truth: Reference, half: Reference, rule: "HalfRule | None") -> "Floor":
        rule = rule or HALF_RULE
        if not (truth.routing and truth.routing.scores and half.routing and half.routing.scores):
            return cls(layer_rel_diff(truth, half.keys, half.values), kl_divergence(truth.logits, half.logits))
        n = truth.keys.shape[2]
        flips = routing_mod.flips(truth.routing, routing_mod.host_choices(half.routing, torch.arange(n)), n)
        flipped = _after(flips, truth.keys.shape[0], n)
        last = any(bool(f[-1]) for f in flips.values())  # the logits' token: this run's KL is no floor then
        return cls(layer_rel_diff(truth, half.keys, half.values, ~flipped),
                   math.nan if last else kl_divergence(truth.logits, half.logits), flips, flipped,
                   routing_mod.near_ties(truth.routing, half.routing, rule.tie_factor))


def half_models(path, dtype: str) -> list:
    """transformers' own attention implementations in ``dtype`` that load for this model: eager,
    and sdpa (what transformers runs by default) where the model takes it."""
    models = [load_model(path, dtype, "cpu", attn_implementation="eager")]
    try:
        models.append(load_model(path, dtype, "cpu", attn_implementation="sdpa"))
    except (ValueError, ImportError):  # a model without an sdpa path: eager alone
        pass
    return models


def unexplained_flips(ref: Reference, floor: Floor, flips: dict[int, torch.Tensor]) -> list[str]:
    """Each token whose first change of experts in the method's run (``flips``: router layer ->
    tokens) is neither a near-tie in float32 nor one eager's 16-bit run made too, described."""
    n = ref.keys.shape[2]
    seen, eager = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    out = []
    for layer in sorted(flips):
        eager |= floor.flips.get(layer, torch.zeros(n, dtype=torch.bool))
        first = flips[layer] & ~seen
        bad = first & ~floor.ties.get(layer, torch.zeros(n, dtype=torch.bool)) & ~eager
        margin = ref.routing.margin(layer) if layer in ref.routing.scores else None
        for t in bad.nonzero().flatten().tolist():
            chose = ref.routing.chosen[layer][t].tolist()
            out.append(f"token {t} left the experts {chose} that float32 chose in layer {layer}"
                       + (f" at a margin of {float(margin[t]):.3g}" if margin is not None else "")
                       + ", more than rounding moves (its input differs)")
        seen |= flips[layer]
    return out


@dataclass
class VerifyRow:
    model: str
    method: str
    world_size: int
    prompt_len: int
    max_abs_logit_diff: float
    kv_max_abs_diff: float
    tokens_match: bool
    exact_expected: bool
    passed: bool
    #: share of the reference's greedy tokens the method chose at the same step (top-1 agreement)
    token_agreement: float = math.nan
    #: KL(reference || method) of the last-token distributions, in nats
    kl_div: float = math.nan
    finite_logits: bool = True
    #: the worst layer's relative K/V difference ``||m - ref|| / ||ref||``
    kv_layer_rel_diff: float = math.nan
    #: bfloat16/float16 rows: the same two measures for transformers' eager attention in that dtype
    #: against the float32 reference (see :class:`HalfRule`)
    floor_layer_rel: float | None = None
    floor_kl: float | None = None
    #: 16-bit rows of a model with experts: the tokens that took other experts than float32 in the
    #: method's and in eager's run, left out of the measures after that layer (see :class:`HalfRule`)
    routing_flips: str | None = None
    #: why the row failed (None when it passed, or could not run: see ``error``)
    reason: str | None = None
    prefill_s: float = math.nan
    error: str | None = None
    stats: list | None = field(default=None, repr=False)  # per-rank communication counters


@dataclass
class Reference:
    logits: torch.Tensor
    keys: torch.Tensor  # (layers, kv_heads, n, head_dim)
    values: torch.Tensor
    tokens: list[int]
    #: a model with experts: the routing of its forward over the prompt (:mod:`apb.model.routing`)
    routing: routing_mod.Routing | None = None


def random_prompt(n: int, vocab_size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_run(model, input_ids: torch.Tensor, n_tokens: int) -> Reference:
    # a cache without the model's config keeps every position of every layer: transformers' own
    # would keep only a sliding layer's last window - 1, and the gathered cache holds them all
    with routing_mod.record(model) as routing:
        out = model(input_ids[None], use_cache=True, **with_cache(model, DynamicCache()))
    cache = output_cache(out)
    whole = KVCache.from_layers(torch.arange(input_ids.numel()), reference_layers(model.config, cache))
    keys, values = whole.keys, whole.values
    # the workers decode past EOS (stop_at_eos=False); so must the reference, without min_new_tokens,
    # which would also forbid EOS where a real model picks it
    # (eos_token_id=None would not do: generate() fills unset fields back from the model's defaults,
    # EOS included, and stopped at a random model's EOS; an empty list stops at nothing)
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = []
    config.do_sample, config.max_new_tokens, config.min_new_tokens, config.pad_token_id = False, n_tokens, None, 0
    gen = model.generate(input_ids[None], attention_mask=torch.ones_like(input_ids[None]), generation_config=config)
    return Reference(out.logits[0, -1].float(), keys, values, gen[0, input_ids.numel():].tolist(),
                     routing if routing.scores else None)


def reference_layers(model_config, cache) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's (k, v) of transformers' cache, as the methods report them: a layer that reuses
    an earlier layer's K/V (Gemma 3n, Gemma 4) keeps none in transformers' cache, and attends its
    source layer's, which is what a method's cache holds for it (:func:`features.kv_sources`)."""
    sources = kv_sources(model_config)
    layers = {}
    # a cache made without the config grows only as far as the last layer that stored K/V
    for i in range(max(len(cache.layers), max(sources, default=-1) + 1)):
        layer = cache.layers[i] if i < len(cache.layers) else None
        k = getattr(layer, "keys", None)
        if (k is None or k.numel() == 0) and i in sources:
            layers[i] = layers[sources[i]]
        else:
            layers[i] = (layer.keys, layer.values)
    return layers


def compare(ref: Reference, result) -> tuple[float, float, bool]:
    logit_diff = (result.last_logits.float() - ref.logits).abs().max().item()
    if result.cache is None or result.cache.keys.shape != ref.keys.shape:
        kv_diff = math.inf
    else:
        kv_diff = max((result.cache.keys.float() - ref.keys.float()).abs().max().item(),
                      (result.cache.values.float() - ref.values.float()).abs().max().item())
    return logit_diff, kv_diff, result.tokens == ref.tokens


def kv_excess(ref: Reference, cache, dtype: str = "float32") -> tuple[float, str]:
    """The largest K/V difference over its layer's :func:`float32_limit` (above 1 fails), and what
    it is: "max|dKV| D > L (T + R x max|K| M of layer L) at K layer L, KV head H, position P"."""
    worst = None
    for name, got, want in (("K", cache.keys, ref.keys), ("V", cache.values, ref.values)):
        diff = (got.float() - want.float()).abs()
        limit = float32_limit(want, dtype)
        ratio = diff / limit.view(-1, *[1] * (diff.dim() - 1))
        flat = int(ratio.argmax())
        if worst is None or ratio.reshape(-1)[flat] > worst[0]:
            at = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
            worst = (float(ratio.reshape(-1)[flat]), name, at, float(diff[at]), float(limit[at[0]]),
                     float(want[at[0]].float().abs().max()))
    ratio, name, (layer, head, pos, _), diff, limit, size = worst
    return ratio, (f"max|dKV| {diff:.2e} > {limit:.2e} ({TOLERANCE[dtype]:g} + {RELATIVE[dtype]:g} x max|{name}| "
                   f"{size:.3g} of layer {layer}) at {name} layer {layer}, KV head {head}, position {pos}")


@dataclass(frozen=True)
class Gates:
    """Thresholds for approximate rows, each applied only when given (None: reported, not judged).
    Exact rows are judged by :func:`float32_limit` (or :class:`HalfRule`) alone."""

    max_logit_diff: float | None = None
    min_token_agreement: float | None = None


def token_agreement(reference: list[int], tokens: list[int] | None) -> float:
    """Top-1 agreement: the share of the reference's greedy tokens that the method chose at the
    same step (a missing token counts as a disagreement)."""
    if not reference:
        return math.nan
    return sum(a == b for a, b in zip(reference, tokens or [])) / len(reference)


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(P_ref || P) in nats between the softmax distributions of two logit vectors, in float64
    (differences of nearly equal fp32 log-probabilities would otherwise round to noise)."""
    log_p = torch.log_softmax(ref_logits.double(), -1)
    log_q = torch.log_softmax(logits.double(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum())


def routing_hint(model_config) -> str | None:
    """What a failed 16-bit exact row of a model that routes tokens to experts may still mean, or
    None for a model without experts: :class:`HalfRule` leaves out the tokens whose experts changed
    at a near-tie, but only those; a router :mod:`apb.model.routing` does not read leaves them in."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    experts = max(int(getattr(text, k, 0) or 0) for k in ("num_local_experts", "n_routed_experts", "num_experts"))
    if experts <= 1:
        return None
    return ("this model routes each token to experts: in 16 bits a rounding difference can flip a near-tied "
            "choice and move that token's K/V in every later layer; the rule leaves out the flips it reads "
            "(routing_flips), and float32 tells any other rounding from a wrong mask")


def judge(ref: Reference, result, exact: bool, dtype: str, gates: Gates = Gates(), floor: Floor | None = None,
          hint: str | None = None, choices: dict | None = None) -> dict:
    """Every measure of one row (the :class:`VerifyRow` fields from ``max_abs_logit_diff`` to
    ``floor_kl``) and ``passed``. ``ref`` is the float32 reference; in a 16-bit dtype an exact row
    is judged against ``floor`` (:class:`HalfRule`), with ``choices`` the experts the method's
    hosts chose (:func:`apb.model.routing.merge_choices`) for a model with experts, and ``hint``
    (:func:`routing_hint`) follows its reason when it fails. Comparisons are written
    ``not x <= limit`` so that NaN fails."""
    logits = result.last_logits
    finite = logits is not None and bool(torch.isfinite(logits).all())
    logit_diff, kv_diff, same = compare(ref, result)
    cache = result.cache
    keys, values = (None, None) if cache is None else (cache.keys, cache.values)
    layer_rel = layer_rel_diff(ref, keys, values)
    kl = kl_divergence(ref.logits, logits) if finite else math.nan
    agree = token_agreement(ref.tokens, result.tokens)
    failures, flips = [], None
    if not finite:
        failures.append("non-finite logits")
    elif exact and dtype in HALF_DTYPES:
        if floor is None:
            raise ValueError(f"an exact row in {dtype} is judged against the rounding floor: pass floor=Floor.measure(...)")
        rule = HALF_RULE
        judge_kl = True
        if floor.flips is not None and math.isfinite(layer_rel):
            n, layers = ref.keys.shape[2], ref.keys.shape[0]
            if choices is None:
                raise ValueError("a 16-bit row of a model with experts is judged with the experts each host "
                                 "chose: pass choices= (PromptRequest(routing=True), prefill(..., routing=True))")
            mine = routing_mod.flips(ref.routing, choices, n)
            bad = unexplained_flips(ref, floor, mine)
            if bad:
                failures.append("; ".join(bad[:3]) + (f"; {len(bad) - 3} more" if len(bad) > 3 else ""))
            left = _after(mine, layers, n) | floor.flipped
            layer_rel = layer_rel_diff(ref, keys, values, ~left)
            flips = flip_summary(mine, floor.flips)
            kept = (~left).float().mean(1)
            if flips and float(kept.min()) < 1:  # how much of the worst layer the measure still saw
                flips += f"; K/V measured on {float(kept.min()):.0%} of the tokens at least (layer {int(kept.argmin())})"
            last = any(bool(f[-1]) for f in mine.values())
            judge_kl = not last and math.isfinite(floor.kl)
        max_layer = max(rule.layer_factor * floor.layer_rel, rule.layer_min)
        max_kl = max(rule.kl_factor * floor.kl, rule.kl_min)
        if not layer_rel <= max_layer:
            failures.append(f"K/V {layer_rel:.2e} from float32 > {max_layer:.2e} ({rule.layer_factor:g}x transformers' "
                            f"own {dtype}'s {floor.layer_rel:.2e})")
        if judge_kl and not kl <= max_kl:
            failures.append(f"KL {kl:.2e} > {max_kl:.2e} ({rule.kl_factor:g}x transformers' own {dtype}'s "
                            f"{floor.kl:.2e})")
        if not judge_kl:
            flips = (flips + "; " if flips else "") + "the last token took other experts, so the KL is reported, not judged"
        if floor.flips is None and hint:  # experts whose routers were not read: no token left out
            flips = "this model's routers were not read (apb.model.routing): no token is left out, so a " \
                    "rounding flip in eager's run loosens the floor; verify in float32 to be sure"
        if failures and hint:
            failures.append(hint)
    elif exact:
        limit = float(float32_limit(ref.logits, dtype))
        if not logit_diff <= limit:
            failures.append(f"max|dlogit| {logit_diff:.2e} > {limit:.2e} ({TOLERANCE[dtype]:g} + {RELATIVE[dtype]:g} "
                            f"x max|logit| {float(ref.logits.abs().max()):.3g})")
        if kv_diff == math.inf:
            failures.append("max|dKV| inf: the cache is missing or of another shape than the reference's")
        elif not kv_diff <= math.inf:
            failures.append(f"max|dKV| {kv_diff}: the cache holds non-finite values")
        else:
            ratio, what = kv_excess(ref, cache, dtype)
            if not ratio <= 1:
                failures.append(what)
        if not same:
            failures.append("greedy tokens differ")
    else:
        if gates.max_logit_diff is not None and not logit_diff <= gates.max_logit_diff:
            failures.append(f"max|dlogit| {logit_diff:.2e} > --max-logit-diff {gates.max_logit_diff:g}")
        if gates.min_token_agreement is not None and not agree >= gates.min_token_agreement:
            failures.append(f"top-1 agreement {agree:.2f} < --min-token-agreement {gates.min_token_agreement:g}")
    return dict(max_abs_logit_diff=logit_diff, kv_max_abs_diff=kv_diff, tokens_match=same, passed=not failures,
                token_agreement=agree, kl_div=kl, finite_logits=finite, kv_layer_rel_diff=layer_rel,
                floor_layer_rel=None if floor is None else floor.layer_rel, floor_kl=None if floor is None else floor.kl,
                routing_flips=flips, reason="; ".join(failures) or None)


def flip_summary(mine: dict[int, torch.Tensor], eager: dict[int, torch.Tensor], show: int = 5) -> str | None:
    """Which tokens took other experts than float32 in each run, at their first router layer:
    "... method 1 token (186 at layer 0); eager none", or None when none did in either."""
    def one(flips: dict[int, torch.Tensor]) -> str:
        first: dict[int, int] = {}
        for layer in sorted(flips):
            for t in flips[layer].nonzero().flatten().tolist():
                first.setdefault(t, layer)
        if not first:
            return "none"
        shown = ", ".join(f"{t} at layer {layer}" for t, layer in sorted(first.items())[:show])
        more = f", {len(first) - show} more" if len(first) > show else ""
        return f"{len(first)} token{'s' if len(first) > 1 else ''} ({shown}{more})"

    if not any(f.any() for f in [*mine.values(), *eager.values()]):
        return None
    return (f"took other experts than float32, left out of the K/V after that layer: method {one(mine)}; "
            f"eager {one(eager)}")


def expand_methods(names: list[str]) -> list[str]:
    """Each method, followed by its ``:uncompressed`` variant where it has one (an exactness check)."""
    out: list[str] = []
    for name in names:
        check_method_name(name)
        out.append(name)
        if ":" not in name and f"{name}:uncompressed" in method_names(with_variants=True):
            out.append(f"{name}:uncompressed")
    return list(dict.fromkeys(out))


def verify(cfg: Config, group, methods: list[str], prompt_lens: list[int], models: list[str] | None = None,
           dtype: str | None = None, n_tokens: int = 16, seed: int = 0, query_len: int = 32,
           decode_mode: str | None = None, gates: Gates = Gates()) -> list[VerifyRow]:
    """Run every (model, prompt length, method) on ``group`` (a started worker group), each row
    decided by :func:`judge` (``gates`` for the approximate methods).

    The last ``query_len`` prompt tokens are the query for the methods that treat it apart.
    """
    dtype = dtype or cfg.model.dtype
    decode_mode = decode_mode or cfg.decode.mode
    options = cfg.method.model_dump(exclude={"name"})
    rows: list[VerifyRow] = []
    world = group.world_size
    for model_name in models or [cfg.model.name_or_path]:
        path = resolve_model(model_name, cfg.model.seed)
        try:  # a model the runtime refuses is one error row per method, before any reference runs
            model_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
            check_supported(model_config)
            check_attention_interface(model_config)
        except ValueError as e:
            rows += [VerifyRow(model=model_name, method=name, world_size=world, prompt_len=n,
                               exact_expected=build_method(name, cfg.method).exact, max_abs_logit_diff=math.nan,
                               kv_max_abs_diff=math.nan, tokens_match=False, passed=False, error=str(e))
                     for n in prompt_lens for name in methods]
            continue
        # the reference is float32 eager; in a 16-bit dtype transformers' own attention in that dtype
        # (eager and sdpa) measures the floor
        ref_model = load_model(path, "float32", "cpu", attn_implementation="eager")
        halves = half_models(path, dtype) if dtype in HALF_DTYPES else []
        for n in prompt_lens:
            ids = random_prompt(n, ref_model.config.vocab_size, seed + n)
            ref = reference_run(ref_model, ids, n_tokens)
            floor = Floor.measure(ref, [reference_run(m, ids, n_tokens) for m in halves]) if halves else None
            routed = floor is not None and floor.flips is not None  # the hosts report their experts
            for name in methods:
                method = build_method(name, cfg.method)
                base = dict(model=model_name, method=name, world_size=world, prompt_len=n,
                            exact_expected=method.exact)
                n_query = min(query_len, n - 1)
                try:
                    method.check(ref_model.config, world)
                    method.check_model(ref_model)
                    method.check_sizes(n, n_query, world)
                except ValueError as e:
                    rows.append(VerifyRow(**base, max_abs_logit_diff=math.nan, kv_max_abs_diff=math.nan,
                                          tokens_match=False, passed=False, error=str(e)))
                    continue
                req = PromptRequest(str(path), ids, name, method_options=options, n_query=n_query,
                                    dtype=dtype, sampling=Sampling(max_new_tokens=n_tokens, stop_at_eos=False),
                                    decode_mode=decode_mode, return_cache=True, routing=routed)
                replies = group.call("run_prompt", req)
                result = replies[0]
                choices = routing_mod.merge_choices([r.routing for r in replies]) if routed else None
                rows.append(VerifyRow(**base, **judge(ref, result, method.exact, dtype, gates, floor,
                                                      routing_hint(ref_model.config), choices),
                                      prefill_s=result.prefill_s, stats=[r.stats for r in replies]))
    return rows


def prefill_comm_mb(stats: list | None) -> float:
    """Most bytes any rank sent during prefill (phases with ``Phase.is_prefill``, as in bench), in MiB."""
    if not stats:
        return math.nan
    return max(sum(o["bytes"] for o in s["ops"] if Phase(o["phase"]).is_prefill) for s in stats) / 2**20


def format_table(rows: list[VerifyRow]) -> str:
    head = ["model", "method", "W", "n", "max|dlogit|", "max|dKV|", "layer dKV rel", "tokens", "top-1", "KL", "exact",
            "prefill s",
            "comm MiB", "result"]
    lines = [head]
    for r in rows:
        lines.append([r.model, r.method, str(r.world_size), str(r.prompt_len), f"{r.max_abs_logit_diff:.2e}",
                      f"{r.kv_max_abs_diff:.2e}", f"{r.kv_layer_rel_diff:.2e}", "same" if r.tokens_match else "differ", f"{r.token_agreement:.2f}",
                      f"{r.kl_div:.2e}", "yes" if r.exact_expected else "no", f"{r.prefill_s:.3f}",
                      f"{prefill_comm_mb(r.stats):.3f}",
                      ("PASS" if r.passed else ("ERROR: " + r.error if r.error else f"FAIL ({r.reason})"))
                      + (f" [{r.routing_flips}]" if r.routing_flips else "")])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines)


def write_json(rows: list[VerifyRow], path: str | Path) -> None:
    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    Path(path).write_text(json.dumps({"results": [{k: clean(v) for k, v in asdict(r).items() if k != "stats"}
                                                  for r in rows]},
                                     indent=2))
