# Session 23: the bench-attn W=8 32K runs with the shared anchor beside the defaults
# (run-s23-shared.sh), each ratio against the ideal at the rates that run measured, and the medians.
# Run: .venv/bin/python docs/results/bench13/shared_summary.py > docs/results/bench13/shared_summary.txt
# and, for the runs after spava's one local call (run-s23-fused.sh):
# .venv/bin/python docs/results/bench13/shared_summary.py fused > docs/results/bench13/fused_summary.txt
# Session 24, spava's anchor split (run-s24-split.sh):
# .venv/bin/python docs/results/bench13/shared_summary.py s24-split > docs/results/bench13/split_summary.txt
# and at the new defaults (apb and spava shared; run-s24-defaults.sh):
# .venv/bin/python docs/results/bench13/shared_summary.py s24-defaults > docs/results/bench13/defaults_summary.txt
# Session 26, the projection from each rank's fastest clock per layer (run-s26-best.sh; in those
# reports projected_s is that projection, projected_median_run_s the median run's):
# .venv/bin/python docs/results/bench13/shared_summary.py s26-best > docs/results/bench13/best_summary.txt
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent
KIND = sys.argv[1] if len(sys.argv) > 1 else "shared"
TAG = KIND if "-" in KIND else f"s23-{KIND}"  # a session's tag, or one of session 23's
RUNS = sorted(p.name for p in HERE.glob(f"bench-attn-w8-32k-{TAG}*.json"))
present = {r["method"] for r in json.loads((HERE / RUNS[0]).read_text())["results"]}
METHODS = [m for m in ["ring", "apb", "apb:shared", "apb:unshared", "spava", "spava:shared", "spava:unshared",
                       "star", "star:shared"] if m in present]
PAIRS = [(a, b) for a, b in [("apb", "ring"), ("apb:shared", "ring"), ("apb:shared", "apb"), ("spava", "ring"),
                             ("spava", "apb"), ("spava", "apb:shared"), ("spava:shared", "ring"),
                             ("spava:shared", "spava"), ("spava:shared", "apb"), ("spava:shared", "apb:shared"),
                             ("star:shared", "star"), ("apb", "apb:unshared"), ("spava", "spava:unshared"),
                             ("spava:unshared", "apb:unshared")]
         if a in present and b in present]
ratios = {p: [] for p in PAIRS}
LABEL = max(26, max(len(f"{a} vs {b}") for a, b in PAIRS) + 2)
COL = {m: max(12, len(m) + 1) for m in METHODS}
print("projected seconds per run (rates in ms per GFLOP: attention / per-token, before -> after the rows)")
print(f"{'run':<40}{'rates':>22}" + "".join(f"{m:>{COL[m]}}" for m in METHODS) + f"{'peak MiB':>10}")
for name in RUNS:
    rep = json.loads((HERE / name).read_text())
    by = {r["method"]: r for r in rep["results"]}
    r, b = rep["rates"], rep.get("rates_before", rep["rates"])
    rates = f"{b['attn_s_per_gflop'] * 1e3:.1f}/{b['linear_s_per_gflop'] * 1e3:.1f}->" \
            f"{r['attn_s_per_gflop'] * 1e3:.1f}/{r['linear_s_per_gflop'] * 1e3:.1f}"
    print(f"{name:<40}{rates:>22}" + "".join(f"{by[m]['projected_s']:>{COL[m]}.3f}" for m in METHODS)
          + f"{max(max(x['rank_peak_mem_mib']) for x in by.values()):>10.0f}")
    for num, den in PAIRS:  # "num vs den": how many times faster num is
        measured = by[den]["projected_s"] / by[num]["projected_s"]
        ideal = by[den]["ideal_s"] / by[num]["ideal_s"]
        ratios[(num, den)].append((measured, ideal))
print()
print(f"{'ratio (x faster)':<{LABEL}}" + "".join(f"{n:>16}" for n in RUNS and [f"run {i + 1}" for i in range(len(RUNS))])
      + f"{'median':>10}{'ideal':>8}{'eff':>6}")
for (num, den), v in ratios.items():
    cells = "".join(f"{f'{m:.2f} ({i:.2f})':>16}" for m, i in v)
    print(f"{num + ' vs ' + den:<{LABEL}}{cells}{statistics.median(m for m, _ in v):>10.2f}"
          f"{statistics.median(i for _, i in v):>8.2f}{statistics.median(m / i for m, i in v):>6.2f}")
# Session 26: the same ratios from the median run's clocks alone (the projection before session 26),
# where the report has them
if all("projected_median_run_s" in r for name in RUNS for r in json.loads((HERE / name).read_text())["results"]):
    print()
    print("the same from the median run's clocks alone (projected_median_run_s)")
    for num, den in PAIRS:
        v = []
        for name in RUNS:
            by = {r["method"]: r for r in json.loads((HERE / name).read_text())["results"]}
            v.append(by[den]["projected_median_run_s"] / by[num]["projected_median_run_s"])
        print(f"{num + ' vs ' + den:<{LABEL}}" + "".join(f"{m:>16.2f}" for m in v) + f"{statistics.median(v):>10.2f}")
