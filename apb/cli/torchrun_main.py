"""Entry point for torchrun: ``torchrun --nproc-per-node N -m apb.cli.torchrun_main --config CFG --input IN
--output OUT``. Rank 0 reads the input and writes the output; all ranks compute. Errors follow the
``apb`` command's policy (:func:`apb.cli.common.report_errors`)."""

from __future__ import annotations

import argparse
import os
import sys

from apb.cli.common import UsageError, config_from, report_errors
from apb.batch import summary_line
from apb.engine import Engine
from apb.parallel.groups.torchrun import TorchrunGroup, control_group, serve
from apb.parallel.rendezvous import under_torchrun
from apb.runtime.worker import Worker


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="apb.cli.torchrun_main")
    ap.add_argument("--config", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--retry-errors", action="store_true", help="retry final error records too (see apb run)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return report_errors(_run, args)


def _run(args: argparse.Namespace) -> int:
    if not under_torchrun():
        raise UsageError("apb.cli.torchrun_main: start me with torchrun (RANK/WORLD_SIZE/LOCAL_RANK are not set)")
    world = int(os.environ["WORLD_SIZE"])
    cfg = config_from(args, ["parallel.launcher=torchrun", f"parallel.world_size={world}"])
    worker = Worker(None, int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"]),
                    device=cfg.parallel.device, timeout_s=cfg.parallel.timeout_s, threads=cfg.parallel.threads,
                    share_gpus=cfg.parallel.share_gpus, retain_freed_memory=cfg.parallel.retain_freed_memory)
    ctl = control_group(cfg.parallel.timeout_s)
    if worker.env.rank != 0:
        serve(worker, ctl)
        worker.close()
        return 0
    group = TorchrunGroup(worker, ctl)
    try:
        engine = Engine(cfg, group=group)
        summary = engine.process_file(args.input, args.output, retry_errors=args.retry_errors)
        print(f"apb: {summary_line(summary)}; wrote {args.output}", file=sys.stderr)
    finally:
        group.close()
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
