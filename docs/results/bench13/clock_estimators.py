# Session 26: the W=8 32K runs that keep every repeat's clocks (run-s26-clocks.sh), projected three
# ways from the same clocks: the median run's alone (the projection before session 26), each rank's
# fastest clock per layer over the repeats, each rank's median clock per layer; then spava vs apb and
# apb vs ring per run and their medians. Communication (bytes at 100 GB/s, 20 us a call) is under 2 ms
# of every projection here and left out of all three alike.
# Run: .venv/bin/python docs/results/bench13/clock_estimators.py > docs/results/bench13/clock_estimators.txt
import json
import statistics
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
RUNS = sorted(HERE.glob("bench-attn-w8-32k-s26-clocks*.json"))


def projection(repeats, pick):
    """Sum over (phase, layer) of the slowest rank's ``pick`` over the repeats of its clock."""
    per = defaultdict(lambda: defaultdict(list))  # (phase, layer) -> rank -> clocks
    for run in repeats:
        for rank, clocks in enumerate(run):
            for phase, layer, cpu in clocks:
                per[(phase, layer)][rank].append(cpu)
    return sum(max(pick(v) for v in ranks.values()) for ranks in per.values())


def median_run(row):
    walls = row["wall_all_s"]
    mid = walls.index(sorted(walls)[len(walls) // 2])
    return projection([row["rank_layer_cpu_s_by_repeat"][mid]], min)


WAYS = {"median run": median_run,
        "fastest per rank and layer": lambda r: projection(r["rank_layer_cpu_s_by_repeat"], min),
        "median per rank and layer": lambda r: projection(r["rank_layer_cpu_s_by_repeat"], statistics.median)}
print("compute seconds projected (ring / apb / spava) and the ratios, per run")
for way, fn in WAYS.items():
    sva, avr = [], []
    print(f"\n{way}")
    for path in RUNS:
        by = {r["method"]: r for r in json.loads(path.read_text())["results"]}
        t = {m: fn(by[m]) for m in ("ring", "apb", "spava")}
        sva.append(t["apb"] / t["spava"])
        avr.append(t["ring"] / t["apb"])
        print(f"  {path.name:<40} {t['ring']:.3f} / {t['apb']:.3f} / {t['spava']:.3f}   spava vs apb {sva[-1]:.3f}"
              f"   apb vs ring {avr[-1]:.3f}")
    print(f"  median: spava vs apb {statistics.median(sva):.3f} (runs >= 1.40: {sum(x >= 1.4 for x in sva)} of "
          f"{len(sva)}), apb vs ring {statistics.median(avr):.3f} (runs >= 2.20: {sum(x >= 2.2 for x in avr)})")
