# Session 21: the bench-attn W=8 32K runs of sessions 16-21 against the ideal at two rates
# (apb.tools.calibrate: the attention kernel's and the per-token work's, one thread, float32),
# with the rates bench-attn-w8-32k-s21.json measured (earlier files predate the measurement; only
# the ratio of the two rates enters an ideal speedup, and that ratio is what is assumed unchanged).
# Run: .venv/bin/python docs/results/bench13/two_rate_ideals.py > docs/results/bench13/two_rate_ideals.txt
import json
from pathlib import Path

from apb.tools.bench import add_ideals
from apb.tools.calibrate import Rates

HERE = Path(__file__).parent
RUNS = ["bench-attn-w8-32k.json", "bench-attn-w8-32k-final.json", "bench-attn-w8-32k-s17.json",
        "bench-attn-w8-32k-s20.json", "bench-attn-w8-32k-s21.json", "bench-attn-w8-32k-s21b.json"]

rates = Rates(**json.loads((HERE / "bench-attn-w8-32k-s21.json").read_text())["rates"])
print(f"rates (s21): attention {rates.attn_s_per_gflop * 1e3:.2f} ms/GFLOP, per-token {rates.linear_s_per_gflop * 1e3:.2f} "
      f"ms/GFLOP ({rates.linear_s_per_gflop / rates.attn_s_per_gflop:.2f}x)")
print(f"{'run':<32}{'method':<8}{'proj s':>8}{'vs ring':>9}{'ideal':>7}{'eff':>6}{'FLOP ratio':>11}{'proj/ideal s':>13}")
for name in RUNS:
    rows = [r for r in json.loads((HERE / name).read_text())["results"] if "error" not in r]
    add_ideals(rows, rates)
    by = {r["method"]: r for r in rows}
    for r in rows:
        print(f"{name:<32}{r['method']:<8}{r['projected_s']:>8.3f}{r['projected_speedup_vs_ring']:>9.2f}"
              f"{r['ideal_speedup_vs_ring']:>7.2f}{r['efficiency_vs_ring']:>6.2f}{r['flop_speedup_vs_ring']:>11.2f}"
              f"{r['projected_s'] / r['ideal_s']:>13.2f}")
    a, s = by["apb"], by["spava"]
    print(f"{'':<32}spava/apb measured {a['projected_s'] / s['projected_s']:.2f}, ideal {a['ideal_s'] / s['ideal_s']:.2f}, "
          f"efficiency {(a['projected_s'] / s['projected_s']) / (a['ideal_s'] / s['ideal_s']):.2f}")

# W = 2 (session 17's run, nothing else running): the same rates, spava against apb
print("\nW = 2, bench-attn-w2-s17.json (4K, 8K, 16K): spava/apb measured, ideal, efficiency")
rows = [r for r in json.loads((HERE / "bench-attn-w2-s17.json").read_text())["results"] if "error" not in r]
add_ideals(rows, rates)
for n in sorted({r["length"] for r in rows}):
    by = {r["method"]: r for r in rows if r["length"] == n}
    a, s = by["apb"], by["spava"]
    measured, ideal = a["projected_s"] / s["projected_s"], a["ideal_s"] / s["ideal_s"]
    print(f"  n={n:<6} spava/apb measured {measured:.2f}, ideal {ideal:.2f}, efficiency {measured / ideal:.2f}; "
          f"apb/ring {by['ring']['projected_s'] / a['projected_s']:.2f} (ideal {by['ring']['ideal_s'] / a['ideal_s']:.2f})")
