"""``apb eval``: task accuracy (passkey, niah, vt, or the user's own JSONL) per method and length.
Modules that import torch are imported inside run(): `apb --help` imports every subcommand module."""

from __future__ import annotations

import argparse

from apb.cli.common import UsageError, add_config_args, check_methods, config_from, csv, model_override, positive_ints, write_json


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="task accuracy (passkey, niah, vt) per method and length")
    add_config_args(p)
    p.add_argument("--model", help="default: the model --config names, else the packaged trained retrieval model")
    p.add_argument("--tasks", default="passkey,niah,vt")
    p.add_argument("--methods", default="full,star,apb,spava")
    p.add_argument("--world-size", type=int, help="default: parallel.world_size")
    p.add_argument("--lengths", type=positive_ints, default=[2048, 4096])
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="your own JSONL {id, context, question, answer} instead of generated tasks")
    p.add_argument("--style", choices=("auto", "code", "chat", "chat-docs"), default="auto",
                   help="generated documents: code (stdlib source, the trained model's phrasing), chat (everyday "
                        "English prose, questions that say the answer's form) or chat-docs (the same over Python's "
                        "technical prose, harder); auto: chat if the tokenizer has a chat template, else code")
    p.add_argument("--scoring", choices=("contains", "exact"), default="contains",
                   help="contains: the expected answer occurs in the output, case and surrounding whitespace "
                        "ignored (vt: every name; RULER's string match); exact: equal after stripping")
    p.add_argument("--json", help="write the results as JSON here, and every document's answers per method "
                                  "beside it (FILE.docs.jsonl)")
    return p


def run(args: argparse.Namespace) -> int:
    # imported on use: `apb --help` builds every subcommand's parser and must not load torch
    from apb.engine import Engine
    from apb.tools import evaluate
    from apb.tools.tasks import TASKS, default_style

    methods = csv(args.methods)
    check_methods(methods)
    overrides = model_override(args, "apb-retrieval")
    if args.world_size:
        overrides.append(f"parallel.world_size={args.world_size}")
    cfg = config_from(args, overrides)
    style = None
    if args.data:
        try:
            docs = evaluate.read_dataset(args.data)
        except ValueError as e:  # a line that is not JSON, or lacks a field
            raise UsageError(f"--data: {e}") from None
    else:
        tasks = csv(args.tasks)
        bad = [t for t in tasks if t not in TASKS]
        if bad:
            raise UsageError(f"--tasks: unknown {', '.join(bad)}; valid tasks: {', '.join(TASKS)}")
        if args.samples < 1:
            raise UsageError(f"--samples must be at least 1, got {args.samples}")
        tokenizer = Engine(cfg).tokenizer
        style = default_style(tokenizer) if args.style == "auto" else args.style
        print(f"documents: {style} style")
        docs = evaluate.generate(tasks, args.lengths, args.samples, tokenizer, args.seed, style)
    docs_path = f"{args.json}.docs.jsonl" if args.json else None
    rows = evaluate.evaluate(cfg, methods, docs, args.config, [*args.overrides, *overrides], scoring=args.scoring,
                             docs_path=docs_path)
    print(evaluate.format_table(rows))
    if args.json:
        write_json(args.json, {"results": rows, "style": style, "scoring": args.scoring, "documents": docs_path},
                   cfg)
    return 0
