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

from pathlib import Path

from apb.cli.common import UsageError, add_config_args, config_from


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
    p.add_argument("--dry-run", action="store_true",
                   help="start no worker: print each document's prompt length and estimated memory per host "
                        "(weights, KV cache, activations, transfers, decode), and which would be refused")
    return p


def run(args: argparse.Namespace) -> int:
    cfg = config_from(args, _own_overrides(args))
    if args.dry_run:
        return _dry_run(cfg, args)
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


def _dry_run(cfg, args: argparse.Namespace) -> int:
    """Estimate every document of the input, run none (no worker group is started)."""
    # imported on use: `apb --help` builds every subcommand's parser and must not load torch
    from apb.batch import read_jsonl
    from apb.engine import Engine
    from apb.runtime.memory import GIB

    path = Path(args.input)
    if not path.is_file():
        raise UsageError(f"--input: {str(path)!r} does not exist")
    engine = Engine(cfg)
    budget = engine.memory_budget
    print(f"method {cfg.method.name} at W={cfg.parallel.world_size}, {cfg.model.dtype}, decode {cfg.decode.mode}; "
          f"budget per host: " + (f"{budget / GIB:.2f} GiB" if budget is not None else "not known (no check)"))
    print(f"{'id':<24} {'tokens':>8} {'peak host':>10} {'GiB':>7} {'weights':>8} {'kv':>7} {'activ':>7} "
          f"{'transfer':>8} {'decode':>7}  verdict")
    refused = 0
    for line_no, doc in read_jsonl(path):
        row = engine.estimate_one(doc, f"line-{line_no}")
        refused += row["error"] is not None
        if row["hosts"]:
            worst = max(row["hosts"], key=lambda h: h["total"])
            figures = " ".join(f"{worst[k] / GIB:>{w}.3f}" for k, w in
                               (("total", 7), ("weights", 8), ("kv", 7), ("activations", 7), ("transfer", 8),
                                ("decode", 7)))
            host = str(worst["rank"])
        else:
            figures, host = " " * 50, "-"
        verdict = "ok" if row["error"] is None else f"refused: {row['error']}"
        print(f"{row['id'][:24]:<24} {row['prompt_tokens']:>8} {host:>10} {figures}  {verdict}")
    print(f"apb: dry run, {refused} document(s) would be refused; nothing was run or written")
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
