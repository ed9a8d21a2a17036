# Session 26: the command with the workers keeping freed memory (on) and with the C
# library's defaults (off), alternating (run-s26-retain.sh): projected seconds (the median run's
# clocks; each rank's fastest per layer in brackets), the ratios asked for, the prefill's minor
# page faults summed over the 8 hosts, and the largest host's peak memory. The first pair ran with
# the commit that briefly made the fastest-of projection projected_s (the median run's then sat in
# projected_median_run_s); the fields are read by what they hold.
# Run: .venv/bin/python docs/results/bench13/retain_summary.py > docs/results/bench13/retain_summary.txt
import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent


def median_run(row):
    return row.get("projected_median_run_s", row["projected_s"])


def fastest(row):
    return row["projected_s"] if "projected_median_run_s" in row else row["projected_fastest_s"]


METHODS = ("ring", "apb", "spava")
ratios = {mode: {"spava vs apb": [], "apb vs ring": [], "spava vs apb (fastest)": [],
                 "apb vs ring (fastest)": []} for mode in ("off", "on")}
print(f"{'run':<42}" + "".join(f"{m + ' s':>18}" for m in METHODS) + "".join(f"{m + ' faults':>14}" for m in METHODS)
      + f"{'peak MiB':>10}")
for path in sorted(HERE.glob("bench-attn-w8-32k-s26-retain-*.json"), key=lambda p: (p.stem[-1], p.stem)):
    mode = "on" if "-on" in path.stem else "off"
    by = {r["method"]: r for r in json.loads(path.read_text())["results"]}
    shown = [f"{median_run(by[m]):.3f} ({fastest(by[m]):.3f})" for m in METHODS]
    cells = "".join(f"{c:>18}" for c in shown)
    faults = "".join(f"{sum(by[m]['rank_minor_faults']):>14}" for m in METHODS)
    peak = max(max(by[m]["rank_peak_mem_mib"]) for m in METHODS)
    print(f"{path.name:<42}{cells}{faults}{peak:>10.0f}")
    for key, field in (("", median_run), (" (fastest)", fastest)):
        ratios[mode]["spava vs apb" + key].append(field(by["apb"]) / field(by["spava"]))
        ratios[mode]["apb vs ring" + key].append(field(by["ring"]) / field(by["apb"]))
print()
for mode, table in ratios.items():
    for name, values in table.items():
        print(f"{mode:<4}{name:<28}" + "".join(f"{v:>8.3f}" for v in values)
              + f"   median {statistics.median(values):.3f}")
