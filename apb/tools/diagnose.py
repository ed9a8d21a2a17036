"""``apb diagnose``: why an approximate method answers one document differently from ``full``.

Both ``full`` and the method run the document on the worker group, each returning its gathered
KV cache; the method also returns the passing indices every host chose
(``PromptRequest.diagnostics``). The driver then compares the two, layer by layer and host by
host (a "host" is the one that caches a position under the method's layout; the query's own K/V,
cached by host 0 in the query phase, are a group of their own, ``q``):

* answers: both token lists and texts, and the index of the first token where they part;
* drift: per layer and host, ``||K_m - K_full|| / ||K_full||`` over the host's positions (and V);
* needle: the answer strings found in the context, and the sentences holding them, as token
  spans of the prompt (:func:`find_spans`);
* mass: the query, and the answer tokens both runs generated before they part, replayed over
  each context cache in one eager transformers forward (:func:`query_attention`); per layer the
  share of attention on the needle, averaged over heads, for the last query token, averaged over
  query tokens, and at the token where the answers part; ``kept`` = method / full;
* decoys: the values a wrong answer gave that occur in the context (a distractor key's number,
  :func:`decoy_strings`), their sentences, and the attention mass on them, as for the needle;
* divergence: at the token where the answers part, each cache's most likely next tokens with
  their probabilities (:func:`top_tokens`), so a near tie under ``full`` shows as one;
* recall: per layer, the share of the needle's tokens the compressor passed, averaged over KV
  heads, over the hosts whose blocks hold them (:func:`needle_recall`).

The functions that compare are pure and unit-tested; :func:`diagnose` wires them and returns the
report (a JSON-ready dict), :func:`format_report` prints it.
"""

from __future__ import annotations

import math
import re

import torch

from apb.config import Config, ConfigError
from apb.engine import encode_prompt
from apb.methods import build_method
from apb.model.catalog import resolve_model
from apb.model.hf_bridge import with_cache
from apb.model.loading import load_model
from apb.model.text import eos_ids, load_tokenizer
from apb.parallel.layout import ChunkKind, HostSlice
from apb.runtime.cache import KVCache, to_hf_cache
from apb.runtime.decode import Sampling
from apb.runtime.worker import PromptRequest
from apb.tools.tasks import score

#: what ends a sentence when a needle is widened from its answer to its sentence
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")


# -- answers ------------------------------------------------------------------------------------
def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where ``a`` and ``b`` differ (one ending early counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# -- where the needle is ------------------------------------------------------------------------
def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _char_to_token(tokenizer, ids: list[int], char: int, first: bool) -> int:
    """With ``first``: the token holding character ``char`` of ``decode(ids)`` (the last j whose prefix
    ends at or before it); else the first j whose prefix reaches ``char``. Binary search on prefix
    decodes, so any tokenizer that decodes prefixes to prefixes works (byte-level BPE does)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2 if first else (lo + hi) // 2
        reached = len(_decode(tokenizer, ids[:mid]))
        if first:
            lo, hi = (mid, hi) if reached <= char else (lo, mid - 1)
        else:
            lo, hi = (mid + 1, hi) if reached < char else (lo, mid)
    return lo


def _sentence_around(text: str, lo: int, hi: int) -> tuple[int, int]:
    starts = [m.end() for m in _SENTENCE_END.finditer(text, 0, lo)]
    start = starts[-1] if starts else 0
    while start < lo and text[start].isspace():
        start += 1
    end = _SENTENCE_END.search(text, hi)
    return start, (end.end() if end and end.group() != "\n" else end.start() if end else len(text))


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def find_spans(tokenizer, ids: list[int], n_ctx: int, answers: list[str], sentence: bool = False
               ) -> list[tuple[int, int]]:
    """Token spans ``[start, stop)`` of the context ``ids[:n_ctx]`` holding each answer string (as a
    whole word), or with ``sentence`` the whole sentence around each; merged where they overlap."""
    ids = list(ids[:n_ctx])
    text = _decode(tokenizer, ids)
    chars = []
    for answer in answers:
        for m in re.finditer(rf"(?<!\w){re.escape(answer.strip())}(?!\w)", text):
            chars.append(_sentence_around(text, *m.span()) if sentence else m.span())
    return _merge([(_char_to_token(tokenizer, ids, lo, True), _char_to_token(tokenizer, ids, hi, False))
                   for lo, hi in _merge(chars)])


def span_positions(spans: list[tuple[int, int]]) -> torch.Tensor:
    parts = [torch.arange(lo, hi) for lo, hi in spans]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


#: a value an answer can give: a word of 3+ characters holding a digit, or an all-capitals name of
#: 3+ letters (vt's variables); shorter numbers ("1", "42") occur everywhere and would mark noise
_VALUE = re.compile(r"\b(?:(?=\w*\d)\w{3,}|[A-Z]{3,})\b")


def decoy_strings(texts: list[str], expected: list[str], context: str) -> list[str]:
    """The values in ``texts`` (the methods' answers) that are not expected but occur in
    ``context`` as whole words: where a wrong answer was read from. In order, without repeats."""
    want = {e.strip().casefold() for e in expected}
    out: list[str] = []
    for text in texts:
        for value in _VALUE.findall(text):
            if (value.casefold() not in want and value not in out
                    and re.search(rf"(?<!\w){re.escape(value)}(?!\w)", context)):
                out.append(value)
    return out


# -- drift --------------------------------------------------------------------------------------
def host_positions(slices: list[HostSlice], n_ctx: int) -> dict[str, torch.Tensor]:
    """The context positions each host caches under a layout (``h0``, ``h1``, ...) and the query's (``q``)."""
    groups = {}
    for s in slices:
        parts = [torch.arange(c.start, min(c.stop, n_ctx)) for c in s.chunks if c.is_cached and c.start < n_ctx]
        groups[f"h{s.rank}"] = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    groups["q"] = torch.arange(n_ctx, slices[0].n_tokens)
    return groups


def relative_drift(ref: torch.Tensor, other: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per layer ``||other - ref|| / ||ref||`` over ``positions`` of two (layers, kv_heads, tokens, d)
    tensors; NaN where ``positions`` is empty."""
    r, o = ref[:, :, positions].float(), other[:, :, positions].float()
    return (o - r).flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1)


# -- attention mass -----------------------------------------------------------------------------
@torch.no_grad()
def query_attention(model, cache: KVCache, n_ctx: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replay ``ids`` (the query, and any answer tokens after it) over the context part of
    ``cache`` (positions ``0..n_ctx-1``) at their true positions, with ``model`` loaded with eager
    attention. Returns the attention probabilities, (layers, heads, rows, n_ctx + rows) in float32,
    and every row's logits, (rows, vocab)."""
    context = cache.head(n_ctx)
    positions = torch.arange(n_ctx, n_ctx + ids.numel())
    out = model(input_ids=ids[None], position_ids=positions[None],
                use_cache=True, output_attentions=True, **with_cache(model, to_hf_cache(context, model.config)))
    if not out.attentions or out.attentions[0] is None:
        raise RuntimeError("the model returned no attention probabilities: load it with attn_implementation='eager'")
    return torch.stack([a[0].float() for a in out.attentions]), out.logits[0].float()


def attention_mass(probs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per layer and row, the share of attention on ``positions`` averaged over heads:
    (layers, rows) from ``probs`` (layers, heads, rows, keys)."""
    return probs[..., positions].sum(-1).mean(1)


def top_tokens(tokenizer, logits: torch.Tensor, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` most likely next tokens of one row of logits, as (text, probability)."""
    p = torch.softmax(logits.float(), -1)
    top = p.topk(k)
    return [(_decode(tokenizer, [int(i)]), _num(float(v))) for v, i in zip(top.values, top.indices)]


def _kept(method: torch.Tensor, full: torch.Tensor) -> list[float | None]:
    return [_num(m / f) if f > 0 else None for m, f in zip(method.tolist(), full.tolist())]


# -- recall -------------------------------------------------------------------------------------
def needle_recall(passing: list[dict[int, torch.Tensor] | None], slices: list[HostSlice], needle: torch.Tensor,
                  num_layers: int, exact: frozenset[int] = frozenset()) -> list[float | None]:
    """Per layer, the share of the needle's tokens that the compressor passed, averaged over KV
    heads, over the hosts whose blocks hold them. ``passing[r][layer]`` is host ``r``'s chosen
    global indices (kv_heads, p). In the ``exact`` layers (``method.exact_layers``) every later
    block sees every needle token: 1. None where no host holding the needle passed anything (no
    passing at that layer, a method without passing, or a needle outside every block)."""
    out = []
    for layer in range(num_layers):
        hit, total = 0.0, 0
        for s, chosen in zip(slices, passing):
            blocks = [torch.arange(c.start, c.stop) for c in s.blocks()]
            held = needle[torch.isin(needle, torch.cat(blocks))] if blocks else needle[:0]
            if held.numel() and layer in exact:
                hit, total = hit + held.numel(), total + held.numel()
                continue
            idx = (chosen or {}).get(layer)
            if held.numel() == 0 or idx is None:
                continue
            hit += float(torch.stack([torch.isin(held, head).sum() for head in idx]).float().mean())
            total += held.numel()
        out.append(hit / total if total else None)
    return out


def needle_hosts(slices: list[HostSlice], needle: torch.Tensor) -> dict[str, int]:
    """How many needle tokens each host caches (``hN``), in a block or an anchor share (spava)."""
    where: dict[str, int] = {}
    for name, pos in host_positions(slices, slices[0].n_tokens).items():
        count = int(torch.isin(needle, pos).sum())
        if count and name != "q":
            where[name] = count
    return where


# -- the run ------------------------------------------------------------------------------------
def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _request(cfg: Config, path, ids, n_query, method, eos, diagnostics) -> PromptRequest:
    d = cfg.decode
    return PromptRequest(str(path), ids, method, method_options=cfg.method.model_dump(exclude={"name"}),
                         n_query=n_query, dtype=cfg.model.dtype, decode_mode=d.mode, eos_ids=eos,
                         sampling=Sampling(max_new_tokens=d.max_new_tokens, temperature=d.temperature, top_p=d.top_p,
                                           seed=d.seed),
                         return_cache=True, diagnostics=diagnostics)


def diagnose(cfg: Config, method: str, doc: dict, group, progress=print) -> dict:
    """Compare ``method`` with ``full`` on ``doc`` ({id, context, question, expected or answer}) on
    ``group`` (a started worker group); returns the report (see the module docstring)."""
    path = resolve_model(cfg.model.name_or_path, cfg.model.seed)
    tokenizer = load_tokenizer(path)
    model = load_model(path, cfg.model.dtype, "cpu", attn_implementation="eager")
    world, layers = group.world_size, model.config.num_hidden_layers
    approx = build_method(method, cfg.method)
    try:
        approx.check(model.config, world)
    except ValueError as e:
        raise ConfigError(f"method {method!r}: {e}") from None
    ids, n_query = encode_prompt(tokenizer, doc, cfg.decode.max_new_tokens,
                                 int(getattr(model.config, "max_position_embeddings", 0) or 1 << 62), True)
    n_ctx = int(ids.numel()) - n_query
    eos = eos_ids(tokenizer, model.config)
    runs = {}
    for name, diag in (("full", False), (method, True)):
        progress(f"running {name} on {world} hosts ({ids.numel()} prompt tokens)")
        runs[name] = group.call("run_prompt", _request(cfg, path, ids, n_query, name, eos, diag))
    full, other = runs["full"][0], runs[method][0]
    slices = approx.layout(int(ids.numel()), world, n_query)
    expected = doc.get("expected", doc.get("answer"))
    answers = [expected] if isinstance(expected, str) else list(expected or [])

    report = {"document": {k: doc.get(k) for k in ("id", "task", "length", "question", "answer")},
              "model": cfg.model.name_or_path, "method": method, "world_size": world,
              "prompt_tokens": int(ids.numel()), "n_ctx": n_ctx, "n_query": n_query,
              "layout": [[(ChunkKind(c.kind).value, c.start, c.stop, c.is_cached) for c in s.chunks] for s in slices],
              "answers": {}}
    for name, r in (("full", full), (method, other)):
        text = tokenizer.decode([t for t in r.tokens if t not in eos], skip_special_tokens=True).strip()
        report["answers"][name] = {"tokens": r.tokens, "text": text, "prefill_s": r.prefill_s,
                                   "correct": score(text, answers) if answers else None}
    report["first_divergence"] = first_divergence(full.tokens, other.tokens)

    spans = {"answer": find_spans(tokenizer, ids.tolist(), n_ctx, answers),
             "needle": find_spans(tokenizer, ids.tolist(), n_ctx, answers, sentence=True)}
    needle = span_positions(spans["needle"])
    report["needle"] = {"spans": spans["needle"], "answer_spans": spans["answer"],
                        "text": [_decode(tokenizer, ids[lo:hi].tolist()) for lo, hi in spans["needle"]],
                        "hosts": needle_hosts(slices, needle)}

    groups = host_positions(slices, n_ctx) | {"needle": needle}
    drift = {kind: {g: relative_drift(getattr(full.cache, kind), getattr(other.cache, kind), pos).tolist()
                    for g, pos in groups.items()} for kind in ("keys", "values")}

    div = report["first_divergence"]
    shared = full.tokens[:div] if div else []  # the answer tokens both runs generated alike
    replay_ids = torch.cat([ids[n_ctx:], torch.tensor(shared, dtype=ids.dtype)])
    last_query, last_row = n_query - 1, n_query - 1 + len(shared)
    spans["decoy"] = find_spans(tokenizer, ids.tolist(), n_ctx,
                                decoy_strings([a["text"] for a in report["answers"].values()], answers,
                                              _decode(tokenizer, ids[:n_ctx].tolist())), sentence=True)
    report["decoy"] = {"spans": spans["decoy"],
                       "text": [_decode(tokenizer, ids[lo:hi].tolist()) for lo, hi in spans["decoy"]],
                       "hosts": needle_hosts(slices, span_positions(spans["decoy"]))}

    progress("replaying the query over both caches (eager attention)")
    probs, replay, top = {}, {}, {}
    for name, r in (("full", full), (method, other)):
        probs[name], logits = query_attention(model, r.cache, n_ctx, replay_ids)
        replay[name] = float((logits[last_query] - r.last_logits.float()).abs().max())
        if div is not None:
            top[name] = top_tokens(tokenizer, logits[last_row])
    report["replay_max_abs_logit_diff"] = replay  # the replay reproduces each run's query pass
    if div is not None:  # what each cache predicts where the answers part, given the same tokens before
        report["divergence"] = {"token": div, "top": top,
                                "chosen": {name: _decode(tokenizer, [r.tokens[div]]) if div < len(r.tokens) else None
                                           for name, r in (("full", full), (method, other))}}
    mass = {}
    for span_name, spn in spans.items():
        pos = span_positions(spn)
        fm, mm = attention_mass(probs["full"], pos), attention_mass(probs[method], pos)
        mass[span_name] = {"full_last": fm[:, last_query].tolist(), "method_last": mm[:, last_query].tolist(),
                           "kept_last": _kept(mm[:, last_query], fm[:, last_query]),
                           "full_mean": fm[:, :n_query].mean(1).tolist(),
                           "method_mean": mm[:, :n_query].mean(1).tolist(),
                           "kept_mean": _kept(mm[:, :n_query].mean(1), fm[:, :n_query].mean(1))}
        if div is not None:
            mass[span_name] |= {"full_div": fm[:, last_row].tolist(), "method_div": mm[:, last_row].tolist(),
                                "kept_div": _kept(mm[:, last_row], fm[:, last_row])}
    passing = [r.diagnostics["passing"] if r.diagnostics else None for r in runs[method]]
    exact = getattr(approx.plan(int(ids.numel()), world, n_query, layers), "exact", frozenset())
    recall = {k: needle_recall(passing, slices, span_positions(v), layers, exact) for k, v in spans.items()}
    report["exact_layers"] = sorted(exact)

    report["layers"] = [
        {"layer": i,
         "k_drift": {g: _num(v[i]) for g, v in drift["keys"].items()},
         "v_drift": {g: _num(v[i]) for g, v in drift["values"].items()},
         "mass": {s: {k: (v[i] if v[i] is None else _num(v[i])) for k, v in m.items()} for s, m in mass.items()},
         "recall": {s: r[i] for s, r in recall.items()}}
        for i in range(layers)]
    return report


# -- output -------------------------------------------------------------------------------------
def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_report(report: dict) -> str:
    """The header (document, needle, answers) and one row per layer."""
    method, ans = report["method"], report["answers"]
    needle = report["needle"]
    where = ", ".join(f"{h}: {n}" for h, n in needle["hosts"].items()) or "not found in the context"
    lines = [f"document {report['document']['id']}: {report['prompt_tokens']} prompt tokens "
             f"({report['n_ctx']} context + {report['n_query']} query), {method} vs full at W={report['world_size']}",
             f"needle tokens {needle['spans']} (held by {where}): {' | '.join(repr(t) for t in needle['text'])}",
             f"expected {report['document']['answer']!r}"]
    for name in ("full", method):
        a = ans[name]
        mark = "" if a["correct"] is None else (" (right)" if a["correct"] else " (wrong)")
        lines.append(f"  {name:>8}: {a['text']!r}{mark}")
    div = report["first_divergence"]
    lines.append("answers: identical tokens" if div is None else f"answers part at generated token {div}")
    decoy = report.get("decoy") or {}
    if decoy.get("spans"):
        where = ", ".join(f"{h}: {n}" for h, n in decoy["hosts"].items()) or "not in a block"
        lines.append(f"decoy tokens {decoy['spans']} (held by {where}): {' | '.join(repr(t) for t in decoy['text'])}")
    if report.get("divergence"):
        d = report["divergence"]
        for name, top in d["top"].items():
            lines.append(f"  next token after the shared {d['token']}, over {name}'s cache: "
                         + ", ".join(f"{t!r} {p:.3f}" for t, p in top))
    lines.append("replay check, max |dlogit| of the eager query pass vs each run: "
                 + ", ".join(f"{k} {v:.1e}" for k, v in report["replay_max_abs_logit_diff"].items()))
    hosts = [g for g in report["layers"][0]["k_drift"] if g != "needle"]
    first = report["layers"][0]["mass"]
    at_div = "full_div" in first["needle"]
    extra = [s for s in ("needle", "decoy") if s in first and at_div and (s == "needle" or decoy.get("spans"))]
    cols = (["layer"] + [f"K {g}" for g in hosts] + [f"V {g}" for g in hosts]
            + ["mass full", f"mass {method}", "kept", "recall"]
            + [f"{s} @div {n}" for s in extra for n in ("full", method)])
    rows = []
    for row in report["layers"]:
        m = row["mass"]["needle"]
        rows.append([str(row["layer"])] + [_f(row["k_drift"][g]) for g in hosts]
                    + [_f(row["v_drift"][g]) for g in hosts]
                    + [_f(m["full_last"]), _f(m["method_last"]), _f(m["kept_last"]), _f(row["recall"]["needle"])]
                    + [_f(row["mass"][s][k]) for s in extra for k in ("full_div", "method_div")])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    lines += ["", "  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    lines.append("K/V hN: relative drift ||m - full|| / ||full|| of the cache host N holds (q: the query's own); "
                 "mass: the last query token's attention on the needle sentence(s), mean over heads; kept = "
                 f"{method} / full; recall: share of needle tokens in the passing blocks, mean over KV heads (1 in "
                 "exact layers, where every block sees them)"
                 + ("; @div: the attention on the needle (decoy) sentence(s) of the token that predicts the first "
                    "differing answer token, both runs' shared answer tokens replayed over each cache" if extra else ""))
    return "\n".join(lines)
