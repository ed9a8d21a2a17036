"""``apb demo``: the embedded default. Local CPU workers, a small model and bundled documents;
one distributed method answers beside ``full``, with timings and answers side by side.
Modules that import torch are imported inside the functions: `apb --help` imports every
subcommand module."""

from __future__ import annotations

import argparse
import json
from importlib import resources

from apb.cli.common import UsageError, add_config_args, config_from


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="run the embedded default: local CPU workers, a small model, "
                                           "bundled documents")
    add_config_args(p)
    p.add_argument("--method", help="method to show beside full (default: method.name)")
    p.add_argument("--model", help="default: the packaged trained retrieval model, if installed")
    p.add_argument("--input", help="JSONL documents (default: the bundled set)")
    return p


def run(args: argparse.Namespace) -> int:
    # imported on use: `apb --help` builds every subcommand's parser and must not load torch
    from apb.engine import Engine, start_group
    from apb.tools.tasks import score

    model = args.model or _default_model(config_from(args))
    overrides = [f"model.name_or_path={model}"]
    cfg = config_from(args, overrides)
    method = args.method or cfg.method.name
    if method == "full":
        raise UsageError("--method: the demo shows a distributed method beside full; pick another")
    docs = _read_docs(args.input or str(resources.files("apb") / "data" / "demo.jsonl"))
    world = cfg.parallel.world_size
    print(f"apb demo: {len(docs)} documents, model {model}, {world} local worker processes, "
          f"method {method} beside full (single host)\n")
    group = start_group(cfg)
    try:
        engines = {m: Engine(config_from(args, overrides + [f"method.name={m}"]), group=group)
                   for m in (method, "full")}
        for e in engines.values():  # warm-up: model load and first-call costs stay out of the timings
            e.process_one(docs[0])
        agree = 0
        correct = {m: 0 for m in engines}
        checkable = 0
        for doc in docs:
            res = {m: e.process_one(doc) for m, e in engines.items()}
            if any(r["error"] for r in res.values()):
                print(f"[{doc.get('id')}] error: {res[method]['error'] or res['full']['error']}")
                continue
            print(f"[{doc['id']}] {res[method]['prompt_tokens']} tokens  Q: {doc['question']}")
            for m, r in res.items():
                print(f"    {m:<8} prefill {r['prefill_s']:7.3f}s  answer: {r['answer']!r}")
            if "answer" in doc:
                print(f"    expected answer: {doc['answer']!r}")
                checkable += 1
                for m, r in res.items():
                    correct[m] += score(r["answer"], doc["answer"])
            agree += res[method]["answer"] == res["full"]["answer"]
        print(f"\n{method} gave the same answer as full on {agree}/{len(docs)} documents")
        if checkable:
            print("right answers: " + ", ".join(f"{m} {correct[m]}/{checkable}" for m in engines))
    finally:
        group.close()
    return 0


def _default_model(cfg) -> str:
    """The packaged retrieval model when installed, else the config's model."""
    # imported on use: `apb --help` builds every subcommand's parser and must not load torch
    from apb.model.loading import packaged_path

    try:
        packaged_path("apb-retrieval")
        return "apb-retrieval"
    except FileNotFoundError:
        return cfg.model.name_or_path


def _read_docs(path: str) -> list[dict]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    docs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UsageError(f"--input {path} line {no} is not valid JSON: {e.msg}") from None
    if not docs:
        raise UsageError(f"--input {path} holds no documents")
    return docs
