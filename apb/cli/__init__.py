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

    r = sub.add_parser("run", help="answer a JSONL file of documents (resumable)")
    _common(r)
    r.add_argument("--input", required=True, help="JSONL: {id, context, question, max_new_tokens?} per line")
    r.add_argument("--output", required=True, help="JSONL results; re-running skips ids already answered")
    r.add_argument("--launcher", choices=["local", "ray", "torchrun"], help="default: parallel.launcher")
    r.add_argument("--world-size", type=int, help="default: parallel.world_size")
    r.add_argument("--method", help="default: method.name")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")

    b = sub.add_parser("bench", help="prefill time per method: measured wall time and projected W-device time")
    _common(b)
    b.add_argument("--model", default="bench-attn", help="preset or checkpoint (default: bench-attn, attention-bound)")
    b.add_argument("--methods", default="full,ring,ulysses,star,apb,spava")
    b.add_argument("--lengths", type=_ints, default=[4096, 8192])
    b.add_argument("--world-size", type=int, default=2)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--query-len", type=int, default=32)
    b.add_argument("--bandwidth-gbs", type=float, default=100.0, help="link bandwidth for the projection")
    b.add_argument("--json", help="write the report as JSON here")
    b.add_argument("--plot", help="write a PNG of time vs length per method")

    e = sub.add_parser("eval", help="task accuracy (passkey, niah, vt) per method and length")
    _common(e)
    e.add_argument("--model", default="apb-retrieval", help="default: the packaged trained retrieval model")
    e.add_argument("--tasks", default="passkey,niah,vt")
    e.add_argument("--methods", default="full,star,apb,spava")
    e.add_argument("--world-size", type=int, help="default: parallel.world_size")
    e.add_argument("--lengths", type=_ints, default=[2048, 4096])
    e.add_argument("--samples", type=int, default=20)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--data", help="your own JSONL {id, context, question, answer} instead of generated tasks")
    e.add_argument("--json", help="write the results as JSON here")

    sm = sub.add_parser("simulate", help="analytical cost model: predict prefill time on GPU clusters")
    _common(sm)
    sm.add_argument("--reference", choices=["apb-paper"], help="predict a published table and compare")
    sm.add_argument("--model", default="llama-3.1-8b", help="llama-3.1-8b, qwen2.5-14b, yi-34b")
    sm.add_argument("--device", default="H100", help="A800, H100, H200")
    sm.add_argument("--methods", default="full,ring,ulysses,star,apb,spava")
    sm.add_argument("--lengths", type=_ints, default=[131072, 1048576])
    sm.add_argument("--world-sizes", type=_ints, default=[8, 16, 32, 64])
    sm.add_argument("--json", help="write the rows as JSON here")

    d = sub.add_parser("demo", help="run the embedded default: local CPU workers, a small model, bundled documents")
    _common(d)
    d.add_argument("--method", help="method to show beside full (default: method.name)")
    d.add_argument("--model", help="default: the packaged trained retrieval model, if installed")
    d.add_argument("--input", help="JSONL documents (default: the bundled set)")
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
    from apb.parallel.groups import WorkerError

    try:
        return {"verify": cmd_verify, "demo": cmd_demo, "run": cmd_run, "simulate": cmd_simulate,
                "bench": cmd_bench, "eval": cmd_eval}[args.command](cfg, args)
    except (ValueError, FileNotFoundError) as e:
        print(f"apb: {e}", file=sys.stderr)
        return 2
    except WorkerError as e:
        print(f"apb: a worker failed, the run was stopped: {e}", file=sys.stderr)
        return 1


def _start_group(cfg, world_size: int):
    from apb.engine import start_group

    return start_group(cfg, world_size, launcher="local")  # verify compares local processes with the reference


def _check_methods(names: list[str]) -> None:
    from apb.methods import check_method_name

    for name in names:
        try:
            check_method_name(name)
        except ValueError as e:
            raise ValueError(f"--methods: {e}") from None


def cmd_verify(cfg, args) -> int:
    from apb.tools.verify import expand_methods, format_table, verify, write_json

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


def _run_overrides(args) -> list[str]:
    out = list(args.overrides)
    if getattr(args, "launcher", None):
        out.append(f"parallel.launcher={args.launcher}")
    if getattr(args, "world_size", None):
        out.append(f"parallel.world_size={args.world_size}")
    if getattr(args, "method", None):
        out.append(f"method.name={args.method}")
    return out


def cmd_run(cfg, args) -> int:
    from apb.config import load_config

    cfg = load_config(args.config, _run_overrides(args))
    if cfg.parallel.launcher == "torchrun":
        return _run_torchrun(cfg, args)
    from apb.engine import Engine, summary_line

    with Engine(cfg) as engine:
        summary = engine.process_file(args.input, args.output, progress=not args.no_progress)
    print(f"apb: {summary_line(summary)}; wrote {args.output}")
    return 0


def _run_torchrun(cfg, args) -> int:
    """Start torchrun on this machine with the same engine code (apb.cli.torchrun_main)."""
    import subprocess

    from apb.parallel.rendezvous import free_port

    config = args.config or _default_config_path()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc-per-node", str(cfg.parallel.world_size), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "apb.cli.torchrun_main", "--input", args.input,
           "--output", args.output, "--config", config]
    for item in _run_overrides(args):
        cmd += ["--set", item]
    try:
        return subprocess.run(cmd).returncode
    finally:
        if config != args.config:
            os.unlink(config)


def _default_config_path() -> str:
    """torchrun's processes need a file: write the built-in defaults to a temporary one."""
    import tempfile

    from apb.config import dump_config, load_config

    path = tempfile.NamedTemporaryFile(prefix="apb-defaults-", suffix=".yaml", delete=False).name
    dump_config(load_config(None), path)
    return path


def _dump_results(path: str | None, rows: list[dict], cfg=None) -> None:
    """Write ``{"results": rows}``, and the resolved config beside it (PATH.config.yaml)."""
    if path:
        import json

        from apb.config import dump_config

        with open(path, "w") as f:
            json.dump({"results": rows}, f, indent=2)
        if cfg is not None:
            dump_config(cfg, f"{path}.config.yaml")
        print(f"wrote {path}")


def _fmt_s(x) -> str:
    return "OOM" if x is None else f"{x:.2f}"


def cmd_eval(cfg, args) -> int:
    from apb.tools import evaluate
    from apb.config import load_config
    from apb.engine import Engine

    methods = _csv(args.methods)
    _check_methods(methods)
    overrides = list(args.overrides) + [f"model.name_or_path={args.model}"]
    if args.world_size:
        overrides.append(f"parallel.world_size={args.world_size}")
    cfg = load_config(args.config, overrides)
    if args.data:
        docs = evaluate.read_dataset(args.data)
    else:
        from apb.tools.tasks import TASKS

        tasks = _csv(args.tasks)
        bad = [t for t in tasks if t not in TASKS]
        if bad:
            raise ValueError(f"--tasks: unknown {', '.join(bad)}; valid tasks: {', '.join(TASKS)}")
        docs = evaluate.generate(tasks, args.lengths, args.samples, Engine(cfg).tokenizer, args.seed)
    rows = evaluate.evaluate(cfg, methods, docs, args.config, overrides)
    print(evaluate.format_table(rows))
    _dump_results(args.json, rows, cfg)
    return 0


def cmd_bench(cfg, args) -> int:
    from apb.tools import bench
    from apb.config import load_config

    methods = _csv(args.methods)
    _check_methods(methods)
    if args.repeats < 1 or args.world_size < 1:
        raise ValueError("--repeats and --world-size must be at least 1")
    cfg = load_config(args.config, list(args.overrides) + [f"model.name_or_path={args.model}"])
    report = bench.run_bench(cfg, methods, args.lengths, args.world_size, args.repeats, args.query_len,
                             args.bandwidth_gbs)
    print(bench.format_table(report))
    if args.json:
        from apb.config import dump_config

        bench.write_json(report, args.json)
        dump_config(cfg, f"{args.json}.config.yaml")
        print(f"wrote {args.json}")
    if args.plot:
        bench.plot([(report, "wall_s"), (report, "projected_s")], args.plot)
        print(f"wrote {args.plot}")
    return 0


def _cell(row: dict) -> str:
    ratio = "" if row["ratio"] is None else f" ({row['ratio']:.2f})"
    return f"{_fmt_s(row['predicted_s'])}/{_fmt_s(row['published_s'])}{ratio}"


def cmd_simulate(cfg, args) -> int:
    from apb.tools import simulate as cm

    if args.reference:
        rows = cm.compare_reference()
        ref = cm.REFERENCE
        print(f"{ref['name']}: {cm.MODELS[ref['model']].name} on {ref['world_size']} x {cm.DEVICES[ref['device']].name}, "
              "prefill seconds, predicted / published (ratio)")
        lengths = ref["lengths"]
        print(f"{'method':<8}" + "".join(f"{n // 1024:>20}K" for n in lengths))
        for method in ref["published"]:
            cells = [r for r in rows if r["method"] == method]
            line = "".join(f"{_cell(r):>21}" for r in cells)
            print(f"{method:<8}{line}")
        hits = sum(r["within_tolerance"] for r in rows)
        print(f"\n{hits}/{len(rows)} cells within +-30% (OOM cells count when both say OOM)")
    else:
        methods = _csv(args.methods)
        if args.model not in cm.MODELS or args.device not in cm.DEVICES:
            raise ValueError(f"--model must be one of {', '.join(cm.MODELS)} and --device one of {', '.join(cm.DEVICES)}")
        rows = cm.scenario(methods, args.lengths, args.world_sizes, args.model, args.device)
        print(f"{cm.MODELS[args.model].name} on {cm.DEVICES[args.device].name}: predicted prefill seconds")
        print(f"{'W':>4} {'tokens':>9} " + "".join(f"{m:>10}" for m in methods))
        for w in args.world_sizes:
            for n in args.lengths:
                cells = {r["method"]: r for r in rows if r["length"] == n and (r["world_size"] == w or
                                                                              r["method"] == "full")}
                print(f"{w:>4} {n:>9} " + "".join(f"{_fmt_s(cells[m]['predicted_s']):>10}" for m in methods))
    _dump_results(args.json, rows)
    return 0


def cmd_demo(cfg, args) -> int:
    import json
    from importlib import resources

    from apb.config import load_config
    from apb.engine import Engine, start_group

    from apb.model.loading import packaged_path
    from apb.tools.tasks import score

    model = args.model
    if model is None:
        try:
            packaged_path("apb-retrieval")
            model = "apb-retrieval"
        except FileNotFoundError:
            model = cfg.model.name_or_path
    overrides = list(args.overrides) + [f"model.name_or_path={model}"]
    cfg = load_config(args.config, overrides)
    method = args.method or cfg.method.name
    if method == "full":
        raise ValueError("--method: the demo shows a distributed method beside full; pick another")
    path = args.input or str(resources.files("apb") / "data" / "demo.jsonl")
    docs = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    world = cfg.parallel.world_size
    print(f"apb demo: {len(docs)} documents, model {model}, {world} local worker processes, "
          f"method {method} beside full (single host)\n")
    group = start_group(cfg)
    try:
        engines = {m: Engine(load_config(args.config, overrides + [f"method.name={m}"]), group=group)
                   for m in (method, "full")}
        for e in engines.values():  # warm-up: model load and first-call costs stay out of the timings
            e.process_one(docs[0])
        agree = 0
        correct = {m: 0 for m in engines}
        checkable = 0
        for doc in docs:
            res = {m: e.process_one(doc) for m, e in engines.items()}
            if any(r["error"] for r in res.values()):
                print(f"[{doc.get('id')}] error: {res[method]['error'] or res['full']['error']}")
                continue
            print(f"[{doc['id']}] {res[method]['prompt_tokens']} tokens  Q: {doc['question']}")
            for m, r in res.items():
                print(f"    {m:<8} prefill {r['prefill_s']:7.3f}s  answer: {r['answer']!r}")
            if "answer" in doc:
                print(f"    expected answer: {doc['answer']!r}")
                checkable += 1
                for m, r in res.items():
                    correct[m] += score(r["answer"], doc["answer"])
            agree += res[method]["answer"] == res["full"]["answer"]
        print(f"\n{method} gave the same answer as full on {agree}/{len(docs)} documents")
        if checkable:
            print("right answers: " + ", ".join(f"{m} {correct[m]}/{checkable}" for m in engines))
    finally:
        group.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
