# Session 22: the four bench-attn W=8 32K runs on the AMD EPYC machine (run-s22-epyc.sh), each
# against the ideal at the rates that run measured, and the median of each ratio.
# Run: .venv/bin/python docs/results/bench13/epyc_summary.py > docs/results/bench13/epyc_summary.txt
import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent
RUNS = ["bench-attn-w8-32k-s22-epyc.json", "bench-attn-w8-32k-s22-epycb.json", "bench-attn-w8-32k-s22-epycc.json",
        "bench-attn-w8-32k-s22-epycd.json"]
ratios = {"apb/ring": [], "spava/ring": [], "spava/apb": []}
print(f"{'run':<36}{'attn ms/GF':>11}{'tok ms/GF':>10}{'ring s':>8}{'apb s':>8}{'spava s':>8}"
      f"{'apb/ring (ideal)':>18}{'spava/ring (ideal)':>20}{'spava/apb (ideal)':>19}{'peak MiB':>10}")
for name in RUNS:
    rep = json.loads((HERE / name).read_text())
    by = {r["method"]: r for r in rep["results"]}
    rates = rep["rates"]
    line = f"{name:<36}{rates['attn_s_per_gflop'] * 1e3:>11.2f}{rates['linear_s_per_gflop'] * 1e3:>10.2f}"
    line += "".join(f"{by[m]['projected_s']:>8.3f}" for m in ("ring", "apb", "spava"))
    for key, width in (("apb/ring", 18), ("spava/ring", 20), ("spava/apb", 19)):
        num, den = key.split("/")[1], key.split("/")[0]
        measured = by[num]["projected_s"] / by[den]["projected_s"]
        ideal = by[num]["ideal_s"] / by[den]["ideal_s"]
        ratios[key].append((measured, ideal))
        line += f"{f'{measured:.2f} ({ideal:.2f})':>{width}}"
    line += f"{max(max(r['rank_peak_mem_mib']) for r in by.values()):>10.0f}"
    print(line)
print("median" + "".join(f"  {k} {statistics.median(m for m, _ in v):.2f} (ideal {statistics.median(i for _, i in v):.2f}, "
                         f"efficiency {statistics.median(m / i for m, i in v):.2f})" for k, v in ratios.items()))
