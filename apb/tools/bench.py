"""``apb bench``: prefill time of each method side by side, measured and projected.

Two figures per (method, length), labelled everywhere:

* ``wall_s`` — median wall time of the prefill on this machine: ``W`` worker processes, each
  pinned to one thread, sharing however many cores the machine has (2 here). With more hosts
  than cores this is *not* the time W devices would take.
* ``projected_s`` — the time on ``W`` dedicated cores: for each layer the slowest rank's CPU
  time (measured per rank with ``time.process_time``, which does not count time spent waiting
  for a core; the clocks cover the whole prefill: the embedding, every layer, the logits, and
  the work around the forwards, such as the layout and stacking the cache),
  summed over layers, plus every byte the slowest rank sent at ``bandwidth_gbs`` and a fixed
  latency per collective call. On CUDA the same clocks are read after a synchronize.
  Each method runs once to warm up, then the repeats run in rounds over the methods (A, B, C,
  A, B, C, ...), so a slow spell of the machine is shared, not one method's.
  The clocks are those of the run with the median wall time. ``projected_fastest_s`` is the same
  sum with each rank's fastest clock per layer over the repeats (:func:`best_layer_clocks`): a
  lower bound, for a balanced method on an oversubscribed machine, where the slowest of ``W``
  noisy clocks counts whichever rank the noise hit; at ``W`` = 2 on 2 cores it falls up to 6%
  below wall where the median run's agrees within 3% (session 26), so it is reported beside the
  projection, not as it. Every repeat's clocks are in the row (``rank_layer_cpu_s_by_repeat``).

Every row also reports each host's peak memory through the prefill (``rank_peak_mem_mib``: peak
RSS on a CPU host, max allocated on CUDA) and the K/V it kept (``rank_kv_mib``), and, against ``full`` and ``ring``, the ideal speedup
the cost model gives for the same shape beside the projected one; their ratio is the efficiency.
The ideal times the slowest host's work (the method's own cost formula: attention FLOPs and the
per-token linear FLOPs) at this device's two rates, measured after the rows by
:func:`apb.tools.calibrate.measure_rates` (``rates`` in the report; ``ideal_s`` per row), and
before them too, which only says how steady the machine was (``rates_before``; ``rates_drift``:
the larger relative change of the two); the ratio of FLOPs alone, every FLOP at one rate, stays
beside it (``flop_speedup_vs_*``).

Per rank it also reports compute and communication seconds and bytes (from the collective
instrumentation), the slowest host's attention FLOPs (the method's own cost formula, through
:mod:`apb.tools.simulate`), and speedups against ``full`` and ``ring`` at the same length.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoConfig

from apb.config import Config
from apb.engine import available_cores, start_group
from apb.methods import build_method, method_names
from apb.runtime import measure
from apb.runtime.decode import Sampling
from apb.model.catalog import resolve_model
from apb.model.loading import load_model
from apb.parallel.comm import Phase
from apb.parallel.rendezvous import pick_device
from apb.tools import simulate as costmodel
from apb.tools.calibrate import Rates, measure_rates
from apb.tools.verify import random_prompt
from apb.runtime.worker import PromptRequest

LATENCY_S = 20e-6  # per collective call, in the projection


def best_layer_clocks(runs: list[list[dict]]) -> list[dict]:
    """Per rank, its stats from the first run with every (phase, layer) clock replaced by that
    rank's fastest over ``runs`` (each run: every rank's stats, in rank order). A clock missing
    from a run (none should be) keeps the runs that have it."""
    best = []
    for rank, first in enumerate(runs[0]):
        fastest: dict[tuple[str, int], float] = {}
        for run in runs:
            for item in run[rank]["layer_cpu"]:
                key = (item["phase"], item["layer"])
                fastest[key] = min(fastest.get(key, item["cpu_s"]), item["cpu_s"])
        best.append({**first, "layer_cpu": [{"phase": p, "layer": l, "cpu_s": v} for (p, l), v in fastest.items()]})
    return best


def _projected(stats: list[dict], bandwidth: float) -> tuple[float, float, float]:
    """(projected seconds, compute part, communication part) from every rank's stats."""
    per_layer: dict[tuple[str, int], float] = defaultdict(float)
    for s in stats:
        for item in s["layer_cpu"]:
            key = (item["phase"], item["layer"])
            per_layer[key] = max(per_layer[key], item["cpu_s"])
    compute = sum(per_layer.values())
    comm = 0.0
    for s in stats:
        ops = [o for o in s["ops"] if Phase(o["phase"]).is_prefill]
        comm = max(comm, sum(o["bytes"] for o in ops) / bandwidth + sum(o["calls"] for o in ops) * LATENCY_S)
    return compute + comm, compute, comm


def _model_flop(method: str, n: int, world: int, model_config, n_query: int,
                method_config=None, rates: Rates | None = None) -> tuple[float, float]:
    """(attention, linear) GFLOP of the slowest host, from the method's own cost formula with the
    run's sizes (``method_config``, with the variant's; None: the defaults); the slowest at
    ``rates`` where a formula weighs hosts with different kinds of work (FLOPs alone without)."""
    shape = costmodel.ModelShape.from_config(model_config)
    if rates is not None:
        shape = replace(shape, rates=(rates.linear_s_per_gflop, rates.attn_s_per_gflop))
    sizes = costmodel.Sizes(query=n_query) if method_config is None else \
        costmodel.Sizes(query=n_query).with_method(build_method(method, method_config).config)
    work = costmodel.host_work(method, n, world, shape, sizes)
    return costmodel.attention_flops(work, shape, n) / 1e9, shape.linear_flops(work.tokens) / 1e9


def hf_forward_seconds(model, ids, repeats: int) -> list[float]:
    """Wall seconds of transformers' own prefill (``model`` loaded with ``sdpa`` attention, one
    forward filling its cache, last-token logits only) on the model's device: on a CPU with one
    thread, as each bench worker has; on a GPU synced before each clock is read. The single-device
    baseline ``full`` is compared with."""
    device = next(model.parameters()).device
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ids = ids.to(device)
    try:
        with torch.no_grad():
            model(ids[None], use_cache=True, logits_to_keep=1)  # warm-up
            walls = []
            for _ in range(repeats):
                measure.sync(device)
                t0 = time.perf_counter()
                model(ids[None], use_cache=True, logits_to_keep=1)
                measure.sync(device)
                walls.append(time.perf_counter() - t0)
        return walls
    finally:
        torch.set_num_threads(threads)


def run_bench(cfg: Config, methods: list[str], lengths: list[int], world: int, repeats: int = 3,
              n_query: int = 32, bandwidth_gbs: float = 100.0, progress=print, hf_baseline: bool = False,
              trace: bool = False) -> dict:
    """Every method at every length (see module doc); ``hf_baseline`` adds a row ``hf-sdpa``:
    transformers' own forward on the run's device (:func:`hf_forward_seconds`), wall = projected;
    ``trace`` keeps each row's median run as a timeline (``trace_events``, see :func:`write_trace`)."""
    path = resolve_model(cfg.model.name_or_path, cfg.model.seed)
    model_config = AutoConfig.from_pretrained(path)
    bandwidth = bandwidth_gbs * 1e9
    options = cfg.method.model_dump(exclude={"name"})
    rows = []
    hf_model = None
    # the rates before the rows too: how far they move during the bench says how steady the
    # machine was, and so how far an efficiency can be trusted
    rates_before, _ = _measure_rates(path, cfg, progress)
    group = start_group(cfg, world, launcher="local", timeout_s=3600.0, threads=1)
    runnable = []
    for method in methods:
        try:
            build_method(method, cfg.method).check(model_config, world)
            runnable.append(method)
        except ValueError as e:  # e.g. ulysses with heads not divisible by W: reported, not fatal
            rows += [{"method": method, "length": n, "world_size": world, "error": str(e)} for n in lengths]
            progress(f"{method:<20} skipped: {e}")
    try:
        for n in lengths:
            ids = random_prompt(n, model_config.vocab_size, seed=n)
            reqs = {method: PromptRequest(str(path), ids, method, method_options=options, n_query=n_query,
                                          dtype=cfg.model.dtype, sampling=Sampling(max_new_tokens=1), timed=True,
                                          trace=trace) for method in runnable}
            for req in reqs.values():
                group.call("run_prompt", req)  # warm-up: first-call allocations, imports
            # the repeats in rounds over the methods: a slow spell of a shared machine falls on
            # every method's runs alike, not on one method's, so their ratios hold
            by_method = {method: [] for method in runnable}
            for _ in range(repeats):
                for method, req in reqs.items():
                    by_method[method].append(group.call("run_prompt", req))
            for method in runnable:
                runs = by_method[method]
                walls = [r[0].prefill_s for r in runs]
                median = statistics.median(walls)
                mid = runs[walls.index(sorted(walls)[len(walls) // 2])]
                stats = [r.stats for r in mid]
                projected, p_compute, p_comm = _projected(stats, bandwidth)
                fastest = _projected(best_layer_clocks([[r.stats for r in run] for run in runs]), bandwidth)[0]
                attn_gf, linear_gf = _model_flop(method, n, world, model_config, n_query, cfg.method,
                                                 rates_before)
                row = {
                    "method": method, "length": n, "world_size": world, "repeats": repeats,
                    "wall_s": median, "wall_all_s": walls, "projected_s": projected,
                    "projected_compute_s": p_compute, "projected_comm_s": p_comm,
                    "projected_fastest_s": fastest,
                    # every repeat's clocks, per rank: [phase, layer, cpu s] (the projections above
                    # can be recomputed from them any other way)
                    "rank_layer_cpu_s_by_repeat": [[[[x["phase"], x["layer"], x["cpu_s"]] for x in r.stats["layer_cpu"]]
                                                    for r in run] for run in runs],
                    "rank_compute_cpu_s": [sum(x["cpu_s"] for x in s["layer_cpu"]) for s in stats],
                    "rank_comm_s": [sum(o["seconds"] for o in s["ops"] if Phase(o["phase"]).is_prefill)
                                    for s in stats],
                    "rank_comm_bytes": [sum(o["bytes"] for o in s["ops"] if Phase(o["phase"]).is_prefill)
                                        for s in stats],
                    "attn_gflop_slowest_host": attn_gf,
                    "linear_gflop_slowest_host": linear_gf,
                    "rank_peak_mem_mib": [None if r.peak_prefill_bytes is None else r.peak_prefill_bytes / 2**20
                                          for r in mid],
                    "rank_minor_faults": [r.prefill_faults for r in mid],
                    # the K/V each host kept from its prefill (its part of the cache)
                    "rank_kv_mib": [None if r.cache_bytes is None else r.cache_bytes / 2**20 for r in mid],
                }
                if trace:
                    row["trace_events"] = [[e for e in s.pop("trace", []) if Phase(e["phase"]).is_prefill]
                                           for s in stats]
                else:
                    for s in stats:
                        s.pop("trace", None)
                rows.append(row)
                progress(f"{method:<20} n={n:<7} wall {median:8.3f}s  projected {projected:8.3f}s")
            if hf_baseline:
                if hf_model is None:  # once per run, the first time it is needed
                    hf_model = load_model(path, cfg.model.dtype, pick_device(0, cfg.parallel.device),
                                          attn_implementation="sdpa")
                walls = hf_forward_seconds(hf_model, ids, repeats)
                median = statistics.median(walls)
                attn_gf, linear_gf = _model_flop("full", n, 1, model_config, n_query)
                rows.append({"method": "hf-sdpa", "length": n, "world_size": 1, "repeats": repeats, "wall_s": median,
                             "wall_all_s": walls, "projected_s": median, "projected_fastest_s": min(walls),
                             "projected_compute_s": median,
                             "projected_comm_s": 0.0, "rank_compute_cpu_s": [median], "rank_comm_s": [0.0],
                             "rank_comm_bytes": [0], "attn_gflop_slowest_host": attn_gf,
                             "linear_gflop_slowest_host": linear_gf, "rank_peak_mem_mib": [None]})
                on = "one thread" if hf_model.device.type == "cpu" else str(hf_model.device)
                progress(f"{'hf-sdpa':<20} n={n:<7} wall {median:8.3f}s  (transformers' forward, {on})")
    finally:
        group.close()
    del hf_model
    measured = [r for r in rows if "error" not in r]
    rates, rates_error = None, None
    if measured:  # after the workers are gone: the rates are measured on a quiet process
        rates, rates_error = _measure_rates(path, cfg, progress)
    if rates is not None:  # the slowest host at these rates (which host it is may depend on them)
        for row in (r for r in measured if r["method"] != "hf-sdpa"):
            row["attn_gflop_slowest_host"], row["linear_gflop_slowest_host"] = _model_flop(
                row["method"], row["length"], world, model_config, n_query, cfg.method, rates)
    add_ideals(measured, rates)
    return {"results": rows, "model": cfg.model.name_or_path, "bandwidth_gbs": bandwidth_gbs,
            "rates": None if rates is None else rates.to_dict(), "rates_error": rates_error,
            "rates_before": None if rates_before is None else rates_before.to_dict(),
            "rates_drift": rates_drift(rates_before, rates),
            "latency_s": LATENCY_S, "machine": {"cpus": available_cores(), "platform": platform.platform()},
            "labels": _labels(world, pick_device(0, cfg.parallel.device), cfg.parallel.share_gpus, bandwidth_gbs)}


def _labels(world: int, device: torch.device, share_gpus: bool, bandwidth_gbs: float) -> dict:
    """What the wall and projected columns stand for on this run's device."""
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        shared = share_gpus and gpus < world
        return {"wall_s": f"measured on this machine ({world} processes on {gpus} GPU(s)"
                          + (", taking turns on shared GPUs: not the time of separate GPUs)" if shared else ")"),
                "projected_s": f"projected on {world} dedicated GPUs + links of {bandwidth_gbs} GB/s"
                               + (" (from per-layer clocks of ranks that shared GPUs)" if shared else "")}
    return {"wall_s": f"measured on this machine ({world} processes sharing {available_cores()} cores)",
            "projected_s": f"projected on {world} dedicated cores + links of {bandwidth_gbs} GB/s"}


def _measure_rates(path, cfg: Config, progress) -> tuple[Rates | None, str | None]:
    """This device's two rates for the bench's model and dtype, on a model loaded for the purpose
    and dropped after (None and the reason where they cannot be measured)."""
    progress("measuring this device's attention and per-token rates for the ideal ...")
    try:
        return measure_rates(load_model(path, cfg.model.dtype, pick_device(0, cfg.parallel.device))), None
    except RuntimeError as e:  # the measured rows stand without an ideal
        progress(f"no ideal speedups: {e}")
        return None, str(e)


def rates_drift(before: Rates | None, after: Rates | None) -> float | None:
    """The larger relative change of the two rates between before and after the rows."""
    if before is None or after is None:
        return None
    return max(abs(a / b - 1) for a, b in ((after.attn_s_per_gflop, before.attn_s_per_gflop),
                                           (after.linear_s_per_gflop, before.linear_s_per_gflop)))


def add_ideals(rows: list[dict], rates: Rates | None) -> None:
    """Each row's ideal seconds at ``rates`` and, against ``full`` and ``ring`` at the same length,
    its measured (wall, projected) and ideal speedups and the efficiency (projected over ideal)."""
    for row in rows:
        if rates is not None:
            row["ideal_s"] = rates.seconds(row["attn_gflop_slowest_host"], row["linear_gflop_slowest_host"])
    for row in rows:
        same = {r["method"]: r for r in rows if r["length"] == row["length"]}
        for ref in ("full", "ring"):
            if ref in same:
                row[f"wall_speedup_vs_{ref}"] = same[ref]["wall_s"] / row["wall_s"]
                row[f"projected_speedup_vs_{ref}"] = same[ref]["projected_s"] / row["projected_s"]
                row[f"flop_speedup_vs_{ref}"] = _flop(same[ref]) / _flop(row)
                if rates is not None:
                    ideal = same[ref]["ideal_s"] / row["ideal_s"]
                    row[f"ideal_speedup_vs_{ref}"] = ideal
                    row[f"efficiency_vs_{ref}"] = row[f"projected_speedup_vs_{ref}"] / ideal


def _flop(row: dict) -> float:
    return row["attn_gflop_slowest_host"] + row["linear_gflop_slowest_host"]


def format_table(report: dict) -> str:
    lines = [f"{'method':<20}{'n':>8}{'W':>4}{'wall s':>10}{'proj s':>10}{'proj vs full':>14}{'proj vs ring':>14}"
             f"{'ideal vs ring':>15}{'eff':>6}{'comm MiB':>10}{'attn GFLOP':>12}{'peak MiB':>10}"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"{r['method']:<20}{r['length']:>8}{r['world_size']:>4}  not run: {r['error']}")
            continue
        lines.append(f"{r['method']:<20}{r['length']:>8}{r['world_size']:>4}{r['wall_s']:>10.3f}{r['projected_s']:>10.3f}"
                     f"{r.get('projected_speedup_vs_full', float('nan')):>14.2f}"
                     f"{r.get('projected_speedup_vs_ring', float('nan')):>14.2f}"
                     f"{r.get('ideal_speedup_vs_ring', float('nan')):>15.2f}{r.get('efficiency_vs_ring', float('nan')):>6.2f}"
                     f"{max(r['rank_comm_bytes']) / 2**20:>10.2f}{r['attn_gflop_slowest_host']:>12.2f}"
                     f"{_peak(r):>10}")
    foot = f"(wall: {report['labels']['wall_s']}; proj: {report['labels']['projected_s']}"
    rates = report.get("rates")
    if rates:
        where = "cpu, one thread" if rates.get("device", "cpu") == "cpu" else rates["device"]
        foot += (f"; ideal: the cost model's work at this device's rates ({where}, {rates['dtype']}): attention "
                 f"{rates['attn_s_per_gflop'] * 1e3:.2f} ms/GFLOP, per-token {rates['linear_s_per_gflop'] * 1e3:.2f} "
                 "ms/GFLOP")
        if report.get("rates_drift") is not None:
            foot += f", {report['rates_drift']:.0%} off those measured before the rows"
    return "\n".join(lines) + "\n" + foot + ")"


def _peak(row: dict) -> str:
    """The largest host's peak memory through the prefill, MiB ("?" where it could not be read)."""
    peaks = [p for p in row.get("rank_peak_mem_mib", []) if p is not None]
    return f"{max(peaks):.0f}" if peaks else "?"


def _color(method: str) -> str:
    """The same colour for a method in every panel and every plot."""
    names = method_names(with_variants=True)
    base = names.index(method) if method in names else len(names)
    return f"C{base % 10}"


def plot(panels: list[tuple[dict, str]], path: str | Path) -> None:
    """One panel per (report, "wall_s" | "projected_s"): time vs length per method, log-log."""
    # matplotlib is optional (the bench extra); only plotting needs it
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: no display here
    import matplotlib.pyplot as plt  # optional, as above

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (rep, key) in zip(axes[0], panels):
        by_method = defaultdict(list)
        for r in rep["results"]:
            if "error" not in r:
                by_method[r["method"]].append((r["length"], r[key]))
        for method, pts in by_method.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method, color=_color(method))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("prefill seconds")
        ax.set_title(f"{'wall' if key == 'wall_s' else 'projected'}: {rep['labels'][key]}", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_json(report: dict, path: str | Path) -> None:
    """The report without its timelines (:func:`write_trace` writes those)."""
    rows = [{k: v for k, v in r.items() if k != "trace_events"} for r in report["results"]]
    Path(path).write_text(json.dumps({**report, "results": rows}, indent=2))


def trace_events(report: dict) -> list[dict]:
    """Chrome trace events (the JSON format Perfetto and chrome://tracing open): one process per
    (method, length), one thread per rank for compute (each layer's span) and one for
    communication (each call), times in microseconds from the start of that run."""
    events = []
    for pid, row in enumerate(r for r in report["results"] if r.get("trace_events")):
        ranks = row["trace_events"]
        t0 = min((e["start"] for evs in ranks for e in evs), default=0.0)
        events.append({"ph": "M", "name": "process_name", "pid": pid,
                       "args": {"name": f"{row['method']} n={row['length']} W={row['world_size']}"}})
        for rank, evs in enumerate(ranks):
            for tid, what in ((2 * rank, "compute"), (2 * rank + 1, "comm")):
                events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                               "args": {"name": f"rank {rank} {what}"}})
            for e in evs:
                args = {k: e[k] for k in ("phase", "layer", "cpu_s", "bytes") if k in e}
                events.append({"ph": "X", "name": e["name"], "cat": e["cat"], "pid": pid,
                               "tid": 2 * rank + (e["cat"] == "comm"), "ts": (e["start"] - t0) * 1e6,
                               "dur": e["dur"] * 1e6, "args": args})
    return events


def write_trace(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps({"traceEvents": trace_events(report), "displayTimeUnit": "ms"}))
