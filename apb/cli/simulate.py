"""``apb simulate``: the analytical cost model (:mod:`apb.tools.simulate`), either on a
published table (``--reference``) or on a scenario of models, devices, lengths and world sizes.
The cost model imports the method registry (torch), so it is imported inside the functions:
`apb --help` imports every subcommand module."""

from __future__ import annotations

import argparse

from apb.cli.common import UsageError, add_config_args, check_methods, config_from, csv, positive_ints, write_json


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("simulate", help="analytical cost model: predict prefill time on GPU clusters")
    add_config_args(p)
    p.add_argument("--reference", choices=["apb-paper"], help="predict a published table and compare")
    p.add_argument("--model", default="llama-3.1-8b", help="llama-3.1-8b, qwen2.5-14b, yi-34b")
    p.add_argument("--device", default="H100", help="A800, H100, H200")
    p.add_argument("--methods", default="full,ring,ulysses,star,apb,spava")
    p.add_argument("--lengths", type=positive_ints, default=[131072, 1048576])
    p.add_argument("--world-sizes", type=positive_ints, default=[8, 16, 32, 64])
    p.add_argument("--json", help="write the rows as JSON here")
    return p


def run(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    sized = {f: getattr(cfg.method, f) for f in ("anchor_len", "passing_len", "exact_layers")
             if getattr(cfg.method, f) is not None}
    if args.reference and sized:
        raise UsageError(f"--reference predicts the published runs at their own sizes; the config's "
                         f"{', '.join(f'method.{f}' for f in sized)} would not apply: drop them, or predict a "
                         "scenario (no --reference)")
    rows = _reference() if args.reference else _scenario(args, cfg)
    if args.json:
        write_json(args.json, {"results": rows})
    return 0


def _reference() -> list[dict]:
    # imported on use: `apb --help` builds every subcommand's parser and must not load torch
    from apb.tools import simulate as cm

    rows = cm.compare_reference()
    ref = cm.REFERENCE
    print(f"{ref['name']}: {cm.MODELS[ref['model']].name} on {ref['world_size']} x {cm.DEVICES[ref['device']].name}, "
          "prefill seconds, predicted / published (ratio)")
    print(f"{'method':<8}" + "".join(f"{n // 1024:>20}K" for n in ref["lengths"]))
    for method in ref["published"]:
        line = "".join(f"{_cell(r):>21}" for r in rows if r["method"] == method)
        print(f"{method:<8}{line}")
    hits = sum(r["within_tolerance"] for r in rows)
    print(f"\n{hits}/{len(rows)} cells within +-30% (OOM cells count when both say OOM)")
    return rows


def _scenario(args: argparse.Namespace, cfg) -> list[dict]:
    # imported on use: `apb --help` builds every subcommand's parser and must not load torch
    from apb.tools import simulate as cm

    methods = csv(args.methods)
    check_methods(methods)
    if args.model not in cm.MODELS or args.device not in cm.DEVICES:
        raise UsageError(f"--model must be one of {', '.join(cm.MODELS)} and --device one of {', '.join(cm.DEVICES)}")
    try:  # each method at the config's sizes, which must fit the model (a per-layer list: its layer count)
        rows = cm.scenario(methods, args.lengths, args.world_sizes, args.model, args.device,
                           method_config=cfg.method)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"{cm.MODELS[args.model].name} on {cm.DEVICES[args.device].name}: predicted prefill seconds")
    width = {m: max(10, len(m) + 2) for m in methods}  # variant names are longer than the figures
    print(f"{'W':>4} {'tokens':>9} " + "".join(f"{m:>{width[m]}}" for m in methods))
    for w in args.world_sizes:
        for n in args.lengths:
            cells = {r["method"]: r for r in rows if r["length"] == n and (r["world_size"] == w or
                                                                          r["method"] == "full")}
            print(f"{w:>4} {n:>9} " + "".join(f"{_seconds(cells[m]['predicted_s']):>{width[m]}}" for m in methods))
    return rows


def _cell(row: dict) -> str:
    ratio = "" if row["ratio"] is None else f" ({row['ratio']:.2f})"
    return f"{_seconds(row['predicted_s'])}/{_seconds(row['published_s'])}{ratio}"


def _seconds(x: float | None) -> str:
    return "OOM" if x is None else f"{x:.2f}"
