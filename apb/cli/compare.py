"""``apb compare``: saved ``apb eval`` runs against a reference method's answers, document by document.
Modules that import torch are imported inside run(): `apb --help` imports every subcommand module."""

from __future__ import annotations

import argparse
from pathlib import Path

from apb.cli.common import UsageError, write_json


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compare", help="saved apb eval runs against full's answers: misses, gains, agreement")
    p.add_argument("runs", nargs="+", help="FILE.docs.jsonl files written by apb eval --json FILE")
    p.add_argument("--reference", required=True, help="the FILE.docs.jsonl holding the reference method's answers "
                                                      "on the same documents")
    p.add_argument("--reference-method", default="full", help="the method in --reference to compare with")
    p.add_argument("--json", help="write the rows as JSON here")
    return p


def run(args: argparse.Namespace) -> int:
    # imported on use: `apb --help` builds every subcommand's parser and must not load torch
    from apb.tools import evaluate

    try:
        reference = evaluate.read_answers(args.reference)
        runs = {Path(p).name.removesuffix(".docs.jsonl").removesuffix(".json"): evaluate.read_answers(p)
                for p in args.runs}
        rows = evaluate.compare(runs, reference, args.reference_method)
    except (OSError, ValueError) as e:  # a missing file, a line that is not a record, different documents
        raise UsageError(str(e)) from None
    print(evaluate.format_comparison(rows, args.reference_method))
    if args.json:
        write_json(args.json, {"reference": args.reference, "reference_method": args.reference_method,
                               "rows": rows})
    return 0
