"""``apb run``: answer a JSONL file of documents with the engine, resumably.

With ``--launcher torchrun`` this process starts torchrun on this machine, whose processes run
the same engine through :mod:`apb.cli.torchrun_main`. Modules that import torch are imported
inside the functions: `apb --help` imports every subcommand module.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from apb.cli.common import add_config_args, config_from


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("run", help="answer a JSONL file of documents (resumable)")
    add_config_args(p)
    p.add_argument("--input", required=True, help="JSONL: {id, context, question, max_new_tokens?} per line")
    p.add_argument("--output", required=True, help="JSONL results; re-running skips ids already answered and "
                                                   "documents that failed for good (error_kind final)")
    p.add_argument("--retry-errors", action="store_true",
                   help="on a re-run, try again the documents whose error was final too (e.g. after fixing them)")
    p.add_argument("--launcher", choices=["local", "ray", "torchrun"], help="default: parallel.launcher")
    p.add_argument("--world-size", type=int, help="default: parallel.world_size")
    p.add_argument("--method", help="default: method.name")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    cfg = config_from(args, _own_overrides(args))
    if cfg.parallel.launcher == "torchrun":
        return _run_torchrun(cfg, args)
    # imported on use: `apb --help` builds every subcommand's parser and must not load torch
    from apb.batch import summary_line
    from apb.engine import Engine

    with Engine(cfg) as engine:
        summary = engine.process_file(args.input, args.output, progress=not args.no_progress,
                                      retry_errors=args.retry_errors)
    print(f"apb: {summary_line(summary)}; wrote {args.output}")
    return 0


def _own_overrides(args: argparse.Namespace) -> list[str]:
    """--launcher, --world-size and --method as config overrides (after --set, so they win)."""
    out = []
    if args.launcher:
        out.append(f"parallel.launcher={args.launcher}")
    if args.world_size:
        out.append(f"parallel.world_size={args.world_size}")
    if args.method:
        out.append(f"method.name={args.method}")
    return out


def _run_torchrun(cfg, args: argparse.Namespace) -> int:
    """Start torchrun on this machine with the same engine code (apb.cli.torchrun_main)."""
    # imported on use: `apb --help` builds every subcommand's parser and must not load torch
    from apb.parallel.rendezvous import free_port

    config = args.config or _default_config_path()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc-per-node", str(cfg.parallel.world_size), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "apb.cli.torchrun_main", "--input", args.input,
           "--output", args.output, "--config", config]
    for item in [*args.overrides, *_own_overrides(args)]:
        cmd += ["--set", item]
    if args.retry_errors:
        cmd.append("--retry-errors")
    try:
        return subprocess.run(cmd).returncode
    finally:
        if config != args.config:
            os.unlink(config)


def _default_config_path() -> str:
    """torchrun's processes need a file: write the built-in defaults to a temporary one."""
    # imported on use: `apb --help` builds every subcommand's parser and must not load torch
    from apb.config import dump_config, load_config

    path = tempfile.NamedTemporaryFile(prefix="apb-defaults-", suffix=".yaml", delete=False).name
    dump_config(load_config(None), path)
    return path
