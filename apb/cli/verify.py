"""``apb verify``: run methods on local worker processes and compare each with a single-process
Hugging Face forward (logits, KV cache, greedy tokens). Exact methods must match; approximate
ones are reported, and held to ``--max-logit-diff`` / ``--min-token-agreement`` when given; any
row with non-finite logits fails. Modules that import torch are imported inside run(): `apb
--help` imports every subcommand module."""

from __future__ import annotations

import argparse
import time

from apb.cli.common import UsageError, add_config_args, check_methods, config_beside, config_from, csv, positive_ints


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("verify", help="compare methods with a single-process Hugging Face forward")
    add_config_args(p)
    p.add_argument("--model", help="preset name or local checkpoint path; comma-separated for several")
    p.add_argument("--methods", default="full,ring,ulysses", help="comma-separated method names")
    p.add_argument("--world-size", type=int, help="number of worker processes (default: from the config)")
    p.add_argument("--prompt-len", type=positive_ints, default=[1000], help="prompt length(s), comma-separated")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens to compare")
    p.add_argument("--query-len", type=int, default=32,
                   help="the last N prompt tokens are the query (star/apb/spava treat it apart)")
    p.add_argument("--decode", choices=["gather", "distributed"], help="decode mode (default: from the config)")
    p.add_argument("--max-logit-diff", type=float, metavar="X",
                   help="approximate methods fail when max|dlogit| of the last token exceeds X (default: no gate)")
    p.add_argument("--min-token-agreement", type=float, metavar="F",
                   help="approximate methods fail when fewer than this share (0..1) of the greedy tokens agree "
                        "with the reference, step by step (default: no gate)")
    p.add_argument("--json", help="write the results as JSON here")
    return p


def run(args: argparse.Namespace) -> int:
    # imported on use: `apb --help` builds every subcommand's parser and must not load torch
    from apb.engine import start_group
    from apb.tools.verify import Gates, expand_methods, format_table, verify, write_json

    cfg = config_from(args)
    check_methods(csv(args.methods))
    methods = expand_methods(csv(args.methods))
    world = args.world_size or cfg.parallel.world_size
    if world < 1:
        raise UsageError(f"--world-size must be at least 1, got {world}")
    models = csv(args.model) if args.model else None
    if args.max_logit_diff is not None and not args.max_logit_diff >= 0:
        raise UsageError(f"--max-logit-diff must be >= 0, got {args.max_logit_diff}")
    if args.min_token_agreement is not None and not 0 <= args.min_token_agreement <= 1:
        raise UsageError(f"--min-token-agreement is a share in [0, 1], got {args.min_token_agreement}")
    gates = Gates(args.max_logit_diff, args.min_token_agreement)
    t0 = time.perf_counter()
    with start_group(cfg, world, launcher="local") as group:  # local processes, beside the reference
        rows = verify(cfg, group, methods, args.prompt_len, models=models, dtype=args.dtype, n_tokens=args.tokens,
                      query_len=args.query_len, decode_mode=args.decode, gates=gates)
    print(format_table(rows))
    passed = sum(r.passed for r in rows)
    print(f"\n{passed}/{len(rows)} rows passed ({time.perf_counter() - t0:.1f}s, {world} worker processes)")
    if args.json:
        write_json(rows, args.json)
        config_beside(args.json, cfg)
    return 0 if passed == len(rows) else 1
