"""``apb demo``: the embedded default. A real instruct model answers bundled documents with one
distributed method beside ``full``, with both answers, the expected one and the prefill speedup.

``full`` runs as a single device would: one worker with all of this machine's cores. The method
runs on ``parallel.world_size`` local workers that split the cores between them. The default model
is SmolLM2-135M-Instruct (fetched from the package registry and converted on first use); with
``--model apb-retrieval`` the packaged 3.4M-parameter retrieval model answers its own documents.
"""

from __future__ import annotations

import argparse
import json
import statistics
from importlib import resources

from apb.cli.common import UsageError, add_config_args, config_from, model_override

DEFAULT_MODEL = "smollm2-135m-instruct"
#: bundled documents per model (apb/data/); any other model gets the chat-style set
DOCUMENTS = {"apb-retrieval": "demo.jsonl"}
CHAT_DOCUMENTS = "demo-chat.jsonl"
#: below this median speedup the demo says the setting is too small for the method's advantage
VISIBLE_SPEEDUP = 1.1


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="run the embedded default: a real instruct model, a distributed "
                                           "method beside full, bundled documents")
    add_config_args(p)
    p.add_argument("--method", help="method to show beside full (default: method.name)")
    p.add_argument("--model", help=f"default: the model --config names, else {DEFAULT_MODEL} (fetched once); "
                                   "apb-retrieval: the packaged small model")
    p.add_argument("--input", help="JSONL documents (default: the bundled set for the model)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="tokens to generate per answer (a chat model's answer is a sentence; default 32)")
    return p


def run(args: argparse.Namespace) -> int:
    # imported on use: `apb --help` builds every subcommand's parser and must not load torch
    from apb.engine import Engine, local_threads, start_group
    from apb.tools.tasks import score

    overrides = [*model_override(args, DEFAULT_MODEL), f"decode.max_new_tokens={args.max_new_tokens}"]
    cfg = config_from(args, overrides)
    model = cfg.model.name_or_path
    method = args.method or cfg.method.name
    if method == "full":
        raise UsageError("--method: the demo shows a distributed method beside full; pick another")
    docs = _read_docs(args.input or str(resources.files("apb") / "data" / DOCUMENTS.get(model, CHAT_DOCUMENTS)))
    world = cfg.parallel.world_size
    print(f"apb demo: {len(docs)} documents, model {model}\n"
          f"  full:    1 worker with {local_threads(1)} threads (a single device)\n"
          f"  {method}: {world} worker processes with {local_threads(world)} thread(s) each\n")
    engines = {m: Engine(config_from(args, overrides + [f"method.name={m}", f"parallel.world_size={w}"]))
               for m, w in ((method, world), ("full", 1))}
    try:
        warm = dict(docs[0], id="warm-up", context=docs[0]["context"][:2000])
        for e in engines.values():  # model load and first-call costs stay out of the timings
            e.process_one(warm)
        stats = _answer(docs, engines, method, score)
    finally:
        for e in engines.values():
            e.close()
    _summary(stats, method, len(docs))
    return 0


def _answer(docs, engines, method, score) -> dict:
    stats = {"agree": 0, "checkable": 0, "correct": {m: 0 for m in engines}, "speedups": [], "tokens": []}
    for doc in docs:
        res = {m: e.process_one(doc) for m, e in engines.items()}
        failed = [r["error"] for r in res.values() if r["error"]]
        if failed:
            print(f"[{doc.get('id')}] error: {failed[0]}")
            continue
        speedup = res["full"]["prefill_s"] / res[method]["prefill_s"]
        stats["speedups"].append(speedup)
        stats["tokens"].append(res[method]["prompt_tokens"])
        print(f"[{doc['id']}] {res[method]['prompt_tokens']} tokens  Q: {doc['question']}")
        for m, r in res.items():
            print(f"    {m:<8} prefill {r['prefill_s']:7.2f}s  answer: {r['answer']!r}")
        print(f"    {method} prefill {speedup:.2f}x faster than full", end="")
        if "answer" in doc:
            print(f"; expected answer: {doc['answer']!r}")
            stats["checkable"] += 1
            for m, r in res.items():
                stats["correct"][m] += score(r["answer"], doc["answer"])
        else:
            print()
        stats["agree"] += res[method]["answer"] == res["full"]["answer"]
    return stats


def _summary(stats: dict, method: str, n_docs: int) -> None:
    print(f"\n{method} gave the same answer as full on {stats['agree']}/{n_docs} documents")
    if stats["checkable"]:
        print("right answers: " + ", ".join(f"{m} {c}/{stats['checkable']}" for m, c in stats["correct"].items()))
    if not stats["speedups"]:
        return
    median = statistics.median(stats["speedups"])
    tokens = int(statistics.median(stats["tokens"]))
    print(f"prefill: {method} {median:.2f}x faster than full (median over {len(stats['speedups'])} documents "
          f"of about {tokens} tokens)")
    if median < VISIBLE_SPEEDUP:
        print(f"  at about {tokens} tokens on this machine the prefill is too short for {method}'s advantage to "
              "show: its fixed costs (extra processes, the anchor, the query pass) weigh as much as the "
              "attention it saves; try longer documents")


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
