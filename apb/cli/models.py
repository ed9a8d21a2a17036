"""``apb models``: list the named models and what is on disk; fetch and convert a real model.

``apb models list`` prints one row per name ``model.name_or_path`` accepts (presets, packaged,
real), whether it is cached and where. ``apb models fetch NAME`` makes NAME available offline
(download + GGUF conversion for a real model; also a path to a ``.gguf`` file) and prints the
checkpoint folder on stdout, so it composes: ``--set model.name_or_path=$(apb models fetch ...)``.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("models", help="list the named models and what is cached; fetch a real model")
    sub = p.add_subparsers(dest="models_command", required=True)
    sub.add_parser("list", help="presets, packaged and real models: cached or not, and where")
    f = sub.add_parser("fetch", help="download and convert a real model (once); print its checkpoint folder")
    f.add_argument("name", help="a real model (`apb models list` shows them), any other model name, or a .gguf file")
    return p


def run(args: argparse.Namespace) -> int:
    # imported on use: `apb --help` builds every subcommand's parser and must not load torch
    from apb.model.catalog import format_models, list_models, resolve_model

    if args.models_command == "list":
        print(format_models(list_models()))
        return 0
    print(resolve_model(args.name))  # errors are reported by apb.cli.common.report_errors
    return 0
