"""``apb eval``: task accuracy per method, RULER-style, with every answer kept.

Documents: for each task and length, ``samples`` are generated (:mod:`apb.tools.tasks`, seeded,
so every method sees the same ones; ``style`` picks the code or the chat haystack and phrasing),
or read from the user's JSONL (``{id, context, question, answer}``; ``answer`` a string, or a list
of strings that must all occur).

Flow: one worker group is shared by one :class:`apb.engine.Engine` per method, and each document
is answered by every method in turn (:func:`answer_documents`), so the per-document file grows
as the run goes. A worker failure on a document is that method's error on it: it counts as
wrong, and the group is restarted for the rest of the run. An answer is scored by
:func:`apb.tools.tasks.score` (RULER's string match, or exact match). :func:`summarise` gives per
task, length and method the accuracy with its standard error, the failures, and the agreement
with ``full``: the share of documents whose answer equals full's. The engine's record carries the
decoded text, not the token ids, so agreement compares text: equal token ids give equal text, and
different ids rarely decode alike.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

from apb.config import Config, load_config
from apb.engine import Engine, start_group
from apb.parallel.groups import WorkerError
from apb.tools.tasks import expected, make_example, score


def generate(tasks: list[str], lengths: list[int], samples: int, tokenizer, seed: int = 0,
             style: str = "code") -> list[dict]:
    docs = []
    for task in tasks:
        for n in lengths:
            rng = random.Random(f"{seed}-{task}-{n}")
            for i in range(samples):
                ex = make_example(task, n, tokenizer, rng, idx=i, style=style)
                docs.append(ex | {"task": task, "length": n, "expected": expected(task, ex["answer"])})
    return docs


def read_dataset(path: str | Path) -> list[dict]:
    """The user's documents; ``answer`` is a string, or a list of strings that must all occur."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            rec = json.loads(line)
            missing = {"id", "context", "question", "answer"} - set(rec)
            if missing:
                raise ValueError(f"{path} line {no}: missing {sorted(missing)}; each line needs id, context, "
                                 "question, answer")
            answer = rec["answer"]
            if not (isinstance(answer, str) or (isinstance(answer, list) and answer
                                                and all(isinstance(a, str) for a in answer))):
                raise ValueError(f"{path} line {no}: answer {answer!r} must be a string, or a non-empty list of "
                                 "strings that must all occur in the prediction")
            docs.append(rec | {"task": Path(path).stem, "length": None, "expected": answer})
    return docs


def standard_error(p: float, n: int) -> float:
    """Binomial standard error of an accuracy ``p`` over ``n`` documents: sqrt(p(1-p)/n)."""
    return (p * (1 - p) / n) ** 0.5 if n else 0.0


def agreement(answers: list[dict], reference: list[dict]) -> float:
    """Share of documents where a method's answer equals the reference's (a failed answer agrees with nothing)."""
    same = [a["error"] is None and r["error"] is None and a["answer"] == r["answer"]
            for a, r in zip(answers, reference)]
    return sum(same) / len(same) if same else 0.0


def versus(answers: list[dict], reference: list[dict]) -> dict:
    """A method's answers against the reference's on the same documents, in the same order.

    ``misses``: documents the reference answers right and the method does not; ``gains``: the
    reverse; ``agreement``: see :func:`agreement`. A net loss of one document is a whole document's
    share of accuracy, which is why the table reports the documents and not only the difference.
    """
    misses = [i for i, (a, r) in enumerate(zip(answers, reference)) if r["correct"] and not a["correct"]]
    gains = [i for i, (a, r) in enumerate(zip(answers, reference)) if a["correct"] and not r["correct"]]
    return {"agreement": agreement(answers, reference), "misses": misses, "gains": gains}


def answer_documents(cfg: Config, methods: list[str], docs: list[dict], config_source=None, overrides=(),
                     scoring: str = "contains", docs_path: str | Path | None = None, progress=print) -> list[dict]:
    """Every method's answer to every document, one record per document, also written to ``docs_path``.

    A record: ``task, length, id, question, expected`` and ``answers``: per method its ``answer``,
    ``correct``, ``prefill_s``, ``lead`` (its weakest token's lead, :meth:`Engine.record`) and ``error``. Each record is written as soon as every method has
    answered, so a long run can be read while it goes.
    """
    cfgs = {m: load_config(config_source, [*overrides, f"method.name={m}"]) for m in methods}
    sink = open(docs_path, "w", encoding="utf-8") if docs_path else None  # a bad path fails before any work
    group = None
    records = []
    try:
        group = start_group(cfg)
        engines = {m: Engine(c, group=group) for m, c in cfgs.items()}
        for i, doc in enumerate(docs):
            rec = {"task": doc["task"], "length": doc["length"], "id": doc["id"], "question": doc["question"],
                   "expected": doc["answer"], "answers": {}}
            request = {k: doc[k] for k in ("id", "context", "question")} | {"max_new_tokens": cfg.decode.max_new_tokens}
            for m in methods:
                try:
                    r = engines[m].process_one(request)
                except WorkerError as e:
                    # the group is shared, so the engine cannot rebuild it: the document counts as
                    # wrong, and a fresh group serves the rest of the run
                    r = {"answer": None, "prefill_s": 0.0, "error": f"worker failure: {e}"}
                    progress(f"{doc['id']} {m}: worker failure, restarting the worker group ({e})")
                    group.close(force=True)
                    group = start_group(cfg)
                    engines = {k: Engine(c, group=group) for k, c in cfgs.items()}
                ok = r["error"] is None and score(r["answer"], doc.get("expected", doc["answer"]), scoring)
                rec["answers"][m] = {"answer": r["answer"], "correct": ok, "prefill_s": r["prefill_s"],
                                     "lead": r.get("lead"), "error": r["error"]}
            records.append(rec)
            if sink:
                sink.write(json.dumps(rec) + "\n")
                sink.flush()
            marks = " ".join(f"{m}={'ok' if a['correct'] else ('ERR' if a['error'] else 'x')}"
                             for m, a in rec["answers"].items())
            progress(f"[{i + 1}/{len(docs)}] {doc['id']}: {marks}")
    finally:
        if group is not None:
            group.close()
        if sink:
            sink.close()
    return records


def summarise(records: list[dict], methods: list[str], world_size: int) -> list[dict]:
    """One row per (method, task, length): accuracy, its standard error, failures, agreement with full."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for rec in records:
        cells[(rec["task"], rec["length"] if rec["length"] is not None else "data")].append(rec)
    rows = []
    for m in methods:
        for (task, length), recs in cells.items():
            got = [r["answers"][m] for r in recs]
            acc = sum(a["correct"] for a in got) / len(got)
            row = {"task": task, "method": m, "length": length, "world_size": world_size, "accuracy": acc,
                   "n": len(got), "stderr": standard_error(acc, len(got)), "agreement_with_full": None,
                   "errors": sum(a["error"] is not None for a in got)}
            if "full" in methods:
                v = versus(got, [r["answers"]["full"] for r in recs])
                row |= {"agreement_with_full": v["agreement"], "misses_vs_full": [recs[i]["id"] for i in v["misses"]],
                        "gains_vs_full": [recs[i]["id"] for i in v["gains"]]}
            rows.append(row)
    return rows


def read_answers(path: str | Path) -> list[dict]:
    """The per-document records an ``apb eval --json FILE`` run wrote to ``FILE.docs.jsonl``."""
    records = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, start=1):
            if line.strip():
                rec = json.loads(line)
                if not {"id", "question", "expected", "answers"} <= set(rec):
                    raise ValueError(f"{path} line {no}: not a record of `apb eval --json` (needs id, question, "
                                     "expected, answers); pass the FILE.docs.jsonl written beside its JSON")
                records.append(rec)
    return records


def compare(runs: dict[str, list[dict]], reference: list[dict], reference_method: str = "full") -> list[dict]:
    """Every method of every saved run against ``reference_method``'s answers in ``reference``.

    Runs made separately (a size sweep, a method re-run with other settings) are compared on the
    documents they share with the reference, matched by id; a document whose question or expected
    answer differs between the two files is an error naming it (different documents under the same
    id would make the comparison silently wrong). One row per run, method, task and length.
    """
    ref = {}
    for rec in reference:
        if reference_method not in rec["answers"]:
            raise ValueError(f"reference: document {rec['id']} has no answer by {reference_method!r} "
                             f"(it has {', '.join(rec['answers'])}); choose one with --reference-method")
        ref[rec["id"]] = rec
    rows = []
    for label, records in runs.items():
        cells: dict[tuple, list[dict]] = defaultdict(list)
        for rec in records:
            r = ref.get(rec["id"])
            if r is None:
                raise ValueError(f"{label}: document {rec['id']} is not in the reference; compare runs over the "
                                 "same documents (the same --tasks, --lengths, --samples and --seed, or --data)")
            if (r["question"], r["expected"]) != (rec["question"], rec["expected"]):
                raise ValueError(f"{label}: document {rec['id']} differs from the reference's (question or expected "
                                 "answer): the runs did not generate the same documents")
            cells[(rec["task"], rec["length"] if rec["length"] is not None else "data")].append(rec)
        for (task, length), recs in cells.items():
            for m in dict.fromkeys(k for rec in recs for k in rec["answers"]):
                mine = [rec for rec in recs if m in rec["answers"]]
                got = [rec["answers"][m] for rec in mine]
                base = [ref[rec["id"]]["answers"][reference_method] for rec in mine]
                v = versus(got, base)
                acc = sum(a["correct"] for a in got) / len(got)
                rows.append({"run": label, "method": m, "task": task, "length": length, "n": len(got),
                             "accuracy": acc, "stderr": standard_error(acc, len(got)),
                             "reference_accuracy": sum(b["correct"] for b in base) / len(base),
                             "agreement": v["agreement"], "misses": [mine[i]["id"] for i in v["misses"]],
                             "gains": [mine[i]["id"] for i in v["gains"]],
                             # the reference's own lead there (None in files from before it was recorded)
                             "miss_leads": [base[i].get("lead") for i in v["misses"]],
                             "gain_leads": [base[i].get("lead") for i in v["gains"]],
                             "errors": sum(a["error"] is not None for a in got)})
    return rows


def format_comparison(rows: list[dict], reference_method: str = "full") -> str:
    """One line per compared cell: right / n beside the reference's, misses and gains by document."""
    out = [f"{'run':<40} {'method':<8} {'task':<8} {'length':>6}  right  {reference_method:>6}  net  agree  "
           "misses / gains vs " + reference_method]

    def ids(xs: list[str], leads: list) -> str:  # generated ids end in the document's index: keep only that
        return ",".join(x.rsplit("-", 1)[-1] + ("" if lead is None else f"@{lead:.2f}")
                        for x, lead in zip(xs, leads)) or "-"

    for r in rows:
        right, ref_right = round(r["accuracy"] * r["n"]), round(r["reference_accuracy"] * r["n"])
        out.append(f"{r['run'][:40]:<40} {r['method']:<8} {r['task']:<8} {r['length']!s:>6}  {right:>2}/{r['n']:<2}"
                   f"  {ref_right:>3}/{r['n']:<2} {right - ref_right:>+4}  {r['agreement']:.2f}  "
                   f"{len(r['misses'])} ({ids(r['misses'], r['miss_leads'])}) / "
                   f"{len(r['gains'])} ({ids(r['gains'], r['gain_leads'])})"
                   + (f"  [{r['errors']} failed]" if r["errors"] else ""))
    if any(x is not None for r in rows for x in r["miss_leads"] + r["gain_leads"]):
        out.append(f"id@x: {reference_method}'s lead on that document, its answer's least sure token over the "
                   "runner-up in nats: near 0 a near tie that any change to the cache can flip, above 1 a sure answer")
    return "\n".join(out)


def evaluate(cfg: Config, methods: list[str], docs: list[dict], config_source=None, overrides=(),
             progress=print, scoring: str = "contains", docs_path: str | Path | None = None) -> list[dict]:
    """Answer ``docs`` with every method (:func:`answer_documents`) and return the rows of :func:`summarise`."""
    records = answer_documents(cfg, methods, docs, config_source, overrides, scoring, docs_path, progress)
    return summarise(records, methods, cfg.parallel.world_size)


def format_table(rows: list[dict]) -> str:
    """Accuracy ± standard error per cell, agreement with full in brackets, failed documents flagged."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    keys = list(dict.fromkeys((r["task"], r["length"]) for r in rows))
    at = {(r["task"], r["length"], r["method"]): r for r in rows}

    def cell(r: dict | None) -> str:
        if r is None:
            return "-"
        text = f"{r['accuracy']:.3f} ± {r.get('stderr', 0.0):.3f}"
        if r.get("agreement_with_full") is not None and r["method"] != "full":
            text += f" ({r['agreement_with_full']:.2f})"
        if r.get("errors"):
            text += f" [{r['errors']} failed]"
        return text

    width = max(22, *(len(m) + 2 for m in methods))
    lines = [(f"{'task':<10}{'length':>8}{'n':>5}  " + "".join(f"{m:<{width}}" for m in methods)).rstrip()]
    for task, length in keys:
        n = next(at[(task, length, m)]["n"] for m in methods if (task, length, m) in at)
        lines.append(f"{task:<10}{length!s:>8}{n:>5}  "
                     + "".join(f"{cell(at.get((task, length, m))):<{width}}" for m in methods).rstrip())
    legend = "accuracy ± standard error"
    if any(r.get("agreement_with_full") is not None for r in rows):
        legend += "; (share of documents answered as full answered)"
    if any(r.get("errors") for r in rows):
        legend += "; [documents whose run failed, counted wrong]"
    return "\n".join(lines + [legend])
