"""Session 39: the issue's bench-attn command five times at 502bc7b (run-s39-issue.sh).
Run from this folder: python3 summary_s39.py > summary_s39.txt"""
import json
import statistics

print("bench-attn, W=8, 32K, float32, projected seconds (median run's clocks):")
ratios = {"apb vs ring": [], "spava vs apb": []}
for f in "abcde":
    r = json.load(open(f"bench-attn-w8-32k-s39-{f}.json"))
    x = {y["method"]: y for y in r["results"]}
    ring, apb, spava = (x[m]["projected_s"] for m in ("ring", "apb", "spava"))
    ia, isp = x["apb"]["ideal_speedup_vs_ring"], x["spava"]["ideal_speedup_vs_ring"]
    ratios["apb vs ring"].append((ring / apb, ia))
    ratios["spava vs apb"].append((apb / spava, isp / ia))
    fast = {m: x[m]["projected_fastest_s"] for m in ("ring", "apb", "spava")}
    print(f"  run {f}: ring {ring:.3f} s, apb {apb:.3f}, spava {spava:.3f}; apb vs ring {ring / apb:.2f} (ideal "
          f"{ia:.2f}, efficiency {ring / apb / ia:.2f}); spava vs apb {apb / spava:.2f} (ideal {isp / ia:.2f}, "
          f"efficiency {apb / spava / (isp / ia):.2f}); fastest-of spava vs apb {fast['apb'] / fast['spava']:.2f}; "
          f"peak MiB, largest host: {[round(max(x[m]['rank_peak_mem_mib'])) for m in ('ring', 'apb', 'spava')]}; "
          f"rates drift {r['rates_drift']:.0%}")
for name, got in ratios.items():
    vals = [g for g, _ in got]
    print(f"{name}: {min(vals):.2f}-{max(vals):.2f}, median {statistics.median(vals):.2f}; ideal "
          f"{min(i for _, i in got):.2f}-{max(i for _, i in got):.2f}; efficiency "
          f"{min(g / i for g, i in got):.2f}-{max(g / i for g, i in got):.2f}")
