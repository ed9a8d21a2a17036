"""The ``apb`` command line (also ``python -m apb``)."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: the built-in tiny CPU config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set parallel.timeout_s=60 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="apb", description="Distributed long-context prefill.")
    sub = ap.add_subparsers(dest="command", required=True)

    v = sub.add_parser("verify", help="compare methods with a single-process Hugging Face forward")
    _common(v)
    v.add_argument("--model", help="preset name or local checkpoint path; comma-separated for several")
    v.add_argument("--methods", default="full,ring,ulysses", help="comma-separated method names")
    v.add_argument("--world-size", type=int, help="number of worker processes (default: from the config)")
    v.add_argument("--prompt-len", type=_ints, default=[1000], help="prompt length(s), comma-separated")
    v.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    v.add_argument("--tokens", type=int, default=16, help="greedy tokens to compare")
    v.add_argument("--query-len", type=int, default=32,
                   help="the last N prompt tokens are the query (star/apb/spava treat it apart)")
    v.add_argument("--decode", choices=["gather", "distributed"], help="decode mode (default: from the config)")
    v.add_argument("--json", help="write the results as JSON here")

    d = sub.add_parser("demo", help="run the embedded default: local CPU workers, a small model")
    _common(d)
    d.add_argument("--prompt-len", type=int, default=2048)
    d.add_argument("--methods", default="full,ring,ulysses")
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = _parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from apb.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"apb: {e}", file=sys.stderr)
        return 2
    from apb.parallel.local_group import WorkerError

    try:
        return {"verify": cmd_verify, "demo": cmd_demo}[args.command](cfg, args)
    except (ValueError, FileNotFoundError) as e:
        print(f"apb: {e}", file=sys.stderr)
        return 2
    except WorkerError as e:
        print(f"apb: a worker failed, the run was stopped: {e}", file=sys.stderr)
        return 1


def _start_group(cfg, world_size: int):
    from apb.parallel.local_group import LocalWorkerGroup

    return LocalWorkerGroup(world_size, worker_kwargs={"device": cfg.parallel.device,
                                                       "timeout_s": cfg.parallel.timeout_s},
                            timeout_s=cfg.parallel.timeout_s)


def _check_methods(names: list[str]) -> None:
    from apb.methods import check_method_name

    for name in names:
        try:
            check_method_name(name)
        except ValueError as e:
            raise ValueError(f"--methods: {e}") from None


def cmd_verify(cfg, args) -> int:
    from apb.verify import expand_methods, format_table, verify, write_json

    methods = expand_methods(_csv(args.methods))
    world = args.world_size or cfg.parallel.world_size
    if world < 1:
        raise ValueError(f"--world-size must be at least 1, got {world}")
    models = _csv(args.model) if args.model else None
    t0 = time.perf_counter()
    with _start_group(cfg, world) as group:
        rows = verify(cfg, group, methods, args.prompt_len, models=models, dtype=args.dtype, n_tokens=args.tokens,
                      query_len=args.query_len, decode_mode=args.decode)
    print(format_table(rows))
    passed = sum(r.passed for r in rows)
    print(f"\n{passed}/{len(rows)} rows passed ({time.perf_counter() - t0:.1f}s, {world} worker processes)")
    if args.json:
        from apb.config import dump_config

        write_json(rows, args.json)
        dump_config(cfg, f"{args.json}.config.yaml")
        print(f"wrote {args.json} (resolved config: {args.json}.config.yaml)")
    return 0 if passed == len(rows) else 1


def cmd_demo(cfg, args) -> int:
    from apb.decode import Sampling
    from apb.models import resolve_model
    from apb.verify import random_prompt
    from apb.worker import PromptRequest

    methods = _csv(args.methods)
    _check_methods(methods)
    world = cfg.parallel.world_size
    path = resolve_model(cfg.model.name_or_path, cfg.model.seed)
    print(f"apb demo: model {cfg.model.name_or_path} ({path}), {world} local worker processes, "
          f"a random prompt of {args.prompt_len} tokens, {cfg.decode.max_new_tokens} greedy tokens")
    from transformers import AutoConfig

    ids = random_prompt(args.prompt_len, AutoConfig.from_pretrained(path).vocab_size, seed=0)
    sampling = Sampling(max_new_tokens=cfg.decode.max_new_tokens, temperature=cfg.decode.temperature,
                        top_p=cfg.decode.top_p, seed=cfg.decode.seed, stop_at_eos=False)
    results = {}
    with _start_group(cfg, world) as group:
        for name in methods:
            req = PromptRequest(str(path), ids, name, dtype=cfg.model.dtype, sampling=sampling)
            group.call("run_prompt", req)  # warm-up: model load and first-call overheads
            replies = group.call("run_prompt", req)
            results[name] = replies
    base = results.get("full")
    print(f"\n{'method':<10}{'prefill s':>10}{'comm MB':>10}  {'max|dlogit| vs full':>20}  first tokens")
    for name, replies in results.items():
        r0 = replies[0]
        mb = sum(op["bytes"] for r in replies for op in r.stats["ops"]) / 2**20
        diff = (r0.last_logits - base[0].last_logits).abs().max().item() if base else float("nan")
        print(f"{name:<10}{r0.prefill_s:>10.3f}{mb:>10.2f}  {diff:>20.2e}  {r0.tokens[:8]}")
    if base and any(r[0].tokens != base[0].tokens for r in results.values()):
        print("\nexact methods produced different tokens from full: run `apb verify` for details")
        return 1
    print("\nall methods produced the same tokens as full")
    return 0


if __name__ == "__main__":
    sys.exit(main())
