"""``apb eval``: task accuracy per method, RULER-style.

For each task and length, ``samples`` examples are generated (:mod:`apb.tools.tasks`, seeded, so
every method sees the same ones) or read from the user's JSONL (``{id, context, question,
answer}``). Every method answers them through the same :class:`apb.engine.Engine` path as a
batch job, on one shared worker group, and an answer counts when it matches exactly after
stripping whitespace.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

from apb.config import Config, load_config
from apb.engine import Engine, start_group


def generate(tasks: list[str], lengths: list[int], samples: int, tokenizer, seed: int = 0) -> list[dict]:
    from apb.tools.tasks import make_example

    docs = []
    for task in tasks:
        for n in lengths:
            rng = random.Random(f"{seed}-{task}-{n}")
            for i in range(samples):
                ex = make_example(task, n, tokenizer, rng, idx=i)
                docs.append(ex | {"task": task, "length": n})
    return docs


def read_dataset(path: str | Path) -> list[dict]:
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
            docs.append(rec | {"task": Path(path).stem, "length": None})
    return docs


def evaluate(cfg: Config, methods: list[str], docs: list[dict], config_source=None, overrides=(),
             progress=print) -> list[dict]:
    from apb.tools.tasks import score

    group = start_group(cfg)
    rows = []
    try:
        for method in methods:
            engine = Engine(load_config(config_source, list(overrides) + [f"method.name={method}"]), group=group)
            hits: dict[tuple, list[int]] = defaultdict(list)
            errors = 0
            for doc in docs:
                rec = engine.process_one({k: doc[k] for k in ("id", "context", "question")}
                                         | {"max_new_tokens": cfg.decode.max_new_tokens})
                errors += rec["error"] is not None
                ok = rec["error"] is None and score(rec["answer"], doc["answer"])
                length = doc["length"] if doc["length"] is not None else "data"
                hits[(doc["task"], length)].append(int(ok))
            for (task, length), got in hits.items():
                rows.append({"task": task, "method": method, "length": length, "world_size": cfg.parallel.world_size,
                             "accuracy": sum(got) / len(got), "n": len(got)})
                progress(f"{task:<10} {method:<20} {length!s:>6}  {sum(got)}/{len(got)}")
            if errors:
                progress(f"{method}: {errors} documents failed (counted as wrong)")
    finally:
        group.close()
    return rows


def format_table(rows: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    keys = list(dict.fromkeys((r["task"], r["length"]) for r in rows))
    acc = {(r["task"], r["length"], r["method"]): r for r in rows}
    lines = [f"{'task':<10}{'length':>8}" + "".join(f"{m:>18}" for m in methods)]
    for task, length in keys:
        cells = "".join(f"{acc[(task, length, m)]['accuracy']:>12.3f} (n={acc[(task, length, m)]['n']})"
                        if (task, length, m) in acc else f"{'-':>18}" for m in methods)
        lines.append(f"{task:<10}{length!s:>8}{cells}")
    return "\n".join(lines)
