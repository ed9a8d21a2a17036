"""How sure is full attention itself of each niah (or passkey) answer, and do the approximate
methods' misses sit where it is least sure?

For every document of an `apb eval` niah cell (regenerated from the eval's seed, so the same
documents), transformers' own forward (SmolLM2-135M-Instruct, sdpa, the run's dtype) reads the
prompt and full's answer up to the number (from the cell's per-document outputs), then scores
each key's number in the document as the continuation: log p(number | prompt, answer prefix),
teacher-forced. The key margin is log p(expected) - log p(best other key's number); negative
means the model itself prefers another key's number. The weakest token: along full's whole answer,
teacher-forced, the token whose lead over the runner-up (log p - log p(runner-up)) is smallest:
where a small change in the caches can flip greedy decoding.

Then every per-document output file of that task and length under docs/results/eval-table is read,
and each approximate run's misses (documents full answers and the run does not) are listed with
full's margin there.

    .venv/bin/python docs/results/diagnose/full_margins.py --length 8000 \
        --full docs/results/eval-table/niah-8000-w4.json.docs.jsonl \
        --full docs/results/eval-table/niah-8000-w4-rerun.json.docs.jsonl \
        --json docs/results/diagnose/full-margins-niah-8000.json
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import re
import time

import torch

from apb.engine import encode_prompt
from apb.model.catalog import resolve_model
from apb.model.loading import load_model
from apb.model.text import load_tokenizer
from apb.runtime.decode import token_lead
from apb.tools.evaluate import generate

def _m(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


NUMBER = re.compile(r"(?<!\d)\d{5,}(?!\d)")  # the keys' numbers in a niah document
DIGITS = re.compile(r"\d+")  # where full's answer starts its number (also a wrong, short one)


def full_answers(paths: list[str]) -> dict[str, str]:
    """id -> full's answer text; a later file replaces an earlier one's errors (reruns)."""
    out = {}
    for path in paths:
        for line in open(path):
            rec = json.loads(line)
            a = rec["answers"].get("full")
            if a and not a.get("error") and a.get("answer") is not None:
                out[rec["id"]] = a["answer"]
    return out


@torch.no_grad()
def continuation(model, cache, n: int, first: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Log-probabilities (len(tokens), vocab) of the rows that predict each of ``tokens`` after the
    ``n`` cached prompt tokens (``first``: the prompt's last row), teacher-forced; the cache is
    cropped back to the prompt afterwards."""
    rows = [first]
    if len(tokens) > 1:
        o = model(input_ids=torch.tensor(tokens[:-1])[None], past_key_values=cache, use_cache=True,
                  position_ids=torch.arange(n, n + len(tokens) - 1)[None])
        rows += list(o.logits[0].float())
        cache.crop(-(len(tokens) - 1))  # back to the prompt for the next continuation
    return torch.stack(rows).log_softmax(-1)


def _first_change(tokens: list[int], before: list[int]) -> int:
    """Where ``tokens`` (an answer) leaves ``before`` (its text up to the number, tokenized alone):
    the number's first token (a space before it may merge into it), never past the last token."""
    i = next((i for i, (a, b) in enumerate(zip(tokens, before)) if a != b), len(before))
    return min(i, len(tokens) - 1)


def weakest_token(tokenizer, logp: torch.Tensor, tokens: list[int], start: int = 0) -> dict:
    """Along a teacher-forced answer, from token ``start`` on, the token whose lead over the next
    best token is smallest (log p(token) - log p(best other), negative where greedy decoding would
    not have chosen it)."""
    gaps = {i: token_lead(logp[i], tokens[i]) for i in range(start, len(tokens))}  # as `apb run` records it
    i = min(gaps, key=gaps.__getitem__)
    other = logp[i].clone()
    other[tokens[i]] = float("-inf")
    return {"index": i, "gap": gaps[i], "token": tokenizer.decode([tokens[i]]),
            "runner_up": tokenizer.decode([int(other.argmax())]), "p": math.exp(float(logp[i, tokens[i]])),
            "p_runner_up": math.exp(float(other.max()))}


def misses(task: str, length: int, right: set[str], gains: bool = False) -> dict[str, list[str]]:
    """'file: method' -> ids full answers and that run does not (every run of this task and length);
    with ``gains``, ids full misses and the run answers."""
    out = {}
    for path in sorted(glob.glob("docs/results/eval-table/**/*.docs.jsonl", recursive=True)):
        recs = [json.loads(line) for line in open(path)]
        recs = [r for r in recs if r.get("task", task) == task and str(r["id"]).startswith(f"{task}-{length}-")]
        methods = {m for r in recs for m in r["answers"] if m != "full"}
        for m in sorted(methods):
            got = {r["id"]: r["answers"][m] for r in recs if m in r["answers"]}
            ok = [i for i, a in got.items() if not a.get("error")]
            if not ok:
                continue
            out[f"{path.removeprefix('docs/results/eval-table/')}: {m}"] = sorted(
                (i for i in ok if (i in right) != gains and got[i]["correct"] == gains), key=lambda i: int(i.rsplit("-", 1)[1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="niah", choices=["niah", "passkey"])
    p.add_argument("--length", type=int, required=True)
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--full", action="append", required=True, help="the cell's per-document outputs (full's answers)")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    torch.set_num_threads(2)
    path = resolve_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer(path)
    model = load_model(path, args.dtype, "cpu", attn_implementation="sdpa")
    answers = full_answers(args.full)
    docs = generate([args.task], [args.length], args.samples, tokenizer, args.seed, "chat")
    rows = []
    for doc in docs:
        t = time.time()
        text = answers.get(doc["id"])
        m = DIGITS.search(text or "")
        if m is None:
            rows.append({"id": doc["id"], "skipped": f"full's answer has no number: {text!r}"})
            continue
        cands = list(dict.fromkeys([doc["expected"], *NUMBER.findall(doc["context"])]))
        ids, _ = encode_prompt(tokenizer, doc, 0, 1 << 62, True)
        with torch.no_grad():
            out = model(input_ids=ids[None], use_cache=True, logits_to_keep=1)
        cache, first, n = out.past_key_values, out.logits[0, -1].float(), ids.numel()
        answer = tokenizer(text, add_special_tokens=False)["input_ids"]
        logp = continuation(model, cache, n, first, answer)
        before = tokenizer(text[:m.start()], add_special_tokens=False)["input_ids"]
        digit = _first_change(answer, before)
        weak, weak_number = weakest_token(tokenizer, logp, answer), weakest_token(tokenizer, logp, answer, digit)
        seqs = {c: tokenizer(text[:m.start()] + c, add_special_tokens=False)["input_ids"] for c in cands}
        scores = {c: float(continuation(model, cache, n, first, q).gather(1, torch.tensor(q)[:, None])
                           [_first_change(q, before):].sum())  # the number's tokens only
                  for c, q in seqs.items()}
        right = scores[doc["expected"]]
        others = {c: s for c, s in scores.items() if c != doc["expected"]}
        best = max(others, key=others.get) if others else None
        rows.append({"id": doc["id"], "expected": doc["expected"], "full_answer": text,
                     "full_correct": doc["expected"] in text,
                     "p_expected": math.exp(right), "best_other": best,
                     "p_best_other": math.exp(others[best]) if best else None,
                     "margin": right - others[best] if best else None, "weakest": weak, "weakest_number": weak_number,
                     "scores": scores})
        print(f"{doc['id']}: p(expected)={math.exp(right):.3f} best other {best} "
              f"{math.exp(others[best]) if best else 0:.3f} margin {_m(rows[-1]['margin'])}; weakest token of "
              f"full's answer: #{weak['index']} {weak['token']!r} {weak['p']:.3f} vs {weak['runner_up']!r} "
              f"{weak['p_runner_up']:.3f}; of its number: #{weak_number['index']} {weak_number['token']!r} "
              f"{weak_number['p']:.3f} vs {weak_number['runner_up']!r} {weak_number['p_runner_up']:.3f} "
              f"({time.time() - t:.0f} s)", flush=True)
    right_ids = {r["id"] for r in rows if r.get("full_correct")}
    margin = {r["id"]: r.get("margin") for r in rows}
    gap = {r["id"]: r["weakest"]["gap"] for r in rows if "weakest" in r}
    digit_gap = {r["id"]: r["weakest_number"]["gap"] for r in rows if "weakest" in r}
    runs = misses(args.task, args.length, right_ids)
    won = misses(args.task, args.length, right_ids, gains=True)
    report = {"task": args.task, "length": args.length, "dtype": args.dtype, "documents": rows, "misses": runs, "gains": won}
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    ranked = sorted((gap[i], i) for i in right_ids if i in gap)
    print(f"\nfull right on {len(right_ids)} of {len(rows)}; there, the lead (log p - log p(runner-up)) of its "
          "weakest answer token and of its number's weakest token, and its key margin, weakest first:")
    print("  " + ", ".join(f"{i.rsplit('-', 1)[1]}: {g:.2f} / {digit_gap[i]:.2f} / {_m(margin[i])}"
                           for g, i in ranked))
    for title, table in (("misses of full's right answers", runs), ("answers where full misses", won)):
        print(f"{title}, with full's leads (answer / number) and key margin:")
        for run, ids in table.items():
            print(f"  {run}: " + (", ".join(f"{i.rsplit('-', 1)[1]} ({gap.get(i, float('nan')):.2f} / "
                                            f"{digit_gap.get(i, float('nan')):.2f} / "
                                            f"{_m(margin.get(i))})" for i in ids) or "none"))


if __name__ == "__main__":
    main()
