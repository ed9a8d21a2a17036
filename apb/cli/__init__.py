"""The ``apb`` command line (also ``python -m apb``): one module per subcommand.

Each module named in :data:`COMMANDS` exposes ``add_parser(subparsers)``, which registers the
subcommand with its help and arguments and returns its parser, and ``run(args) -> int``. Adding
a subcommand is one module and one line in the table. :func:`main` parses, then runs the chosen
subcommand under the error policy of :func:`apb.cli.common.report_errors` (a user error is one
line and exit status 2; a bug keeps its traceback).

Building the parser imports every subcommand module (``apb --help`` lists them all), so those
modules import torch-heavy code inside ``run``, never at their top.
"""

from __future__ import annotations

import argparse
import importlib
import os

from apb.cli.common import report_errors

#: subcommand -> the module that implements it, in the order ``apb --help`` lists them
COMMANDS: dict[str, str] = {
    "verify": "apb.cli.verify",
    "run": "apb.cli.run",
    "bench": "apb.cli.bench",
    "eval": "apb.cli.eval",
    "compare": "apb.cli.compare",
    "diagnose": "apb.cli.diagnose",
    "simulate": "apb.cli.simulate",
    "demo": "apb.cli.demo",
    "models": "apb.cli.models",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="apb", description="Distributed long-context prefill.")
    sub = ap.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging  # heavy: only once a subcommand runs

    hf_logging.disable_progress_bar()
    return report_errors(importlib.import_module(COMMANDS[args.command]).run, args)
