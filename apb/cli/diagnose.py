"""``apb diagnose``: for one document, compare an approximate method with ``full`` layer by layer
and host by host (answers, K/V drift, attention mass on the needle, needle recall). Modules that
import torch are imported inside run(): `apb --help` imports every subcommand module."""

from __future__ import annotations

import argparse

from apb.cli.common import UsageError, add_config_args, check_methods, config_from, write_json


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("diagnose", help="why a method answers one document differently from full")
    add_config_args(p)
    p.add_argument("--method", help="the method to compare with full, e.g. apb, spava, star (default: method.name)")
    p.add_argument("--world-size", type=int, help="number of worker processes (default: parallel.world_size)")
    p.add_argument("--data", help="a JSONL file of {id, context, question, answer}; pick one with --id")
    p.add_argument("--id", help="the document of --data to diagnose")
    p.add_argument("--task", choices=("passkey", "niah", "vt"),
                   help="generate the document instead (default passkey); the same as apb eval's for this seed")
    p.add_argument("--length", type=int, default=4096, help="generated document: prompt tokens")
    p.add_argument("--seed", type=int, default=0, help="generated document: apb eval's --seed")
    p.add_argument("--index", type=int, default=0, help="generated document: its index among apb eval's samples")
    p.add_argument("--style", choices=("auto", "code", "chat", "chat-docs"), default="auto",
                   help="generated document: as apb eval --style (auto: chat if the tokenizer has a chat template)")
    p.add_argument("--json", help="write the whole report as JSON here")
    return p


def _document(args: argparse.Namespace, cfg) -> dict:
    # imported on use: `apb --help` builds every subcommand's parser and must not load torch
    from apb.model.catalog import resolve_model
    from apb.model.text import load_tokenizer
    from apb.tools import evaluate
    from apb.tools.tasks import default_style

    if args.data:
        if args.task or not args.id:
            raise UsageError("--data needs --id (the document to diagnose) and takes no --task")
        try:
            docs = evaluate.read_dataset(args.data)
        except ValueError as e:
            raise UsageError(f"--data: {e}") from None
        found = [d for d in docs if d["id"] == args.id]
        if not found:
            raise UsageError(f"--id {args.id!r} is not in {args.data}; its first ids: "
                             f"{', '.join(d['id'] for d in docs[:5])}")
        return found[0]
    if args.length < 1 or args.index < 0:
        raise UsageError(f"--length must be at least 1 and --index at least 0, got {args.length} and {args.index}")
    tokenizer = load_tokenizer(resolve_model(cfg.model.name_or_path, cfg.model.seed))
    style = default_style(tokenizer) if args.style == "auto" else args.style
    # apb eval draws a cell's documents from one generator in order, so document i needs 0..i-1 first
    return evaluate.generate([args.task or "passkey"], [args.length], args.index + 1, tokenizer, args.seed,
                             style)[args.index]


def run(args: argparse.Namespace) -> int:
    # imported on use: `apb --help` builds every subcommand's parser and must not load torch
    from apb.engine import start_group
    from apb.tools.diagnose import diagnose, format_report

    cfg = config_from(args)
    method = args.method or cfg.method.name
    check_methods([method])
    world = args.world_size or cfg.parallel.world_size
    if world < 1:
        raise UsageError(f"--world-size must be at least 1, got {world}")
    doc = _document(args, cfg)
    with start_group(cfg, world, launcher="local") as group:
        report = diagnose(cfg, method, doc, group)
    print(format_report(report))
    if args.json:
        write_json(args.json, report, cfg)
    return 0
