"""``apb bench``: prefill time per method on local workers, measured wall time and the time
projected for W devices. Modules that import torch are imported inside run(): `apb --help`
imports every subcommand module."""

from __future__ import annotations

import argparse

from apb.cli.common import (UsageError, add_config_args, check_methods, config_beside, config_from, csv,
                            model_override, positive_ints)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="prefill time per method: measured wall time and projected W-device time")
    add_config_args(p)
    p.add_argument("--model", help="preset or checkpoint (default: the model --config names, else bench-attn, "
                                   "attention-bound)")
    p.add_argument("--methods", default="full,ring,ulysses,star,apb,spava")
    p.add_argument("--lengths", type=positive_ints, default=[4096, 8192])
    p.add_argument("--world-size", type=int, help="default: parallel.world_size (2 without --config)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per method and length, after one warm-up each; run in rounds over the "
                        "methods (A, B, A, B), so a slow spell of the machine is shared")
    p.add_argument("--query-len", type=int, default=32)
    p.add_argument("--bandwidth-gbs", type=float, default=100.0, help="link bandwidth for the projection")
    p.add_argument("--hf-baseline", action="store_true",
                   help="also time transformers' own forward (sdpa, on the run's device; on a CPU one "
                        "thread, as a worker has) per length: row hf-sdpa")
    p.add_argument("--trace", help="write a Chrome trace (Perfetto, chrome://tracing) of each method's median "
                                   "run: per rank and layer, compute and communication intervals")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--plot", help="write a PNG of time vs length per method")
    return p


def run(args: argparse.Namespace) -> int:
    # imported on use: `apb --help` builds every subcommand's parser and must not load torch
    from apb.tools import bench

    methods = csv(args.methods)
    check_methods(methods)
    if args.repeats < 1 or (args.world_size is not None and args.world_size < 1):
        raise UsageError("--repeats and --world-size must be at least 1")
    cfg = config_from(args, model_override(args, "bench-attn"))
    world = args.world_size or cfg.parallel.world_size
    report = bench.run_bench(cfg, methods, args.lengths, world, args.repeats, args.query_len,
                             args.bandwidth_gbs, hf_baseline=args.hf_baseline, trace=bool(args.trace))
    print(bench.format_table(report))
    if args.json:
        bench.write_json(report, args.json)
        config_beside(args.json, cfg)
    if args.trace:
        bench.write_trace(report, args.trace)
        print(f"wrote {args.trace}")
    if args.plot:
        bench.plot([(report, "wall_s"), (report, "projected_s")], args.plot)
        print(f"wrote {args.plot}")
    return 0
