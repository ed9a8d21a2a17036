"""Summary of session 35's benches on the AVX512-BF16 EPYC (run-s35-bf16cpu.sh).
Run from this folder: python3 summary_s35.py > summary_s35.txt"""
import json

rows = {}
for dt in ("bfloat16", "float32"):
    r = json.load(open(f"smollm2-{dt}-w2-s35-bf16cpu.json"))
    rows[dt] = {x["method"]: x for x in r["results"]}
    print(f"SmolLM2-135M shape, 8K, W=2, {dt} (rates drift {r['rates_drift']:.0%}):")
    for m, x in rows[dt].items():
        proj = x.get("projected_s")
        print(f"  {m:<8} wall {x['wall_s']:7.2f} s  projected {proj if proj is None else round(proj, 2)}  "
              f"peak MiB {x.get('rank_peak_mem_mib')}  K/V MiB {x.get('rank_kv_mib')}")
    full, hf, ring = rows[dt]["full"], rows[dt]["hf-sdpa"], rows[dt]["ring"]
    print(f"  full at W=1 (projected) over transformers' sdpa: {full['projected_s'] / hf['wall_s']:.3f}x its time; "
          f"ring vs full (projected): {full['projected_s'] / ring['projected_s']:.2f}x")
print("bfloat16 vs float32 (float32 time over bfloat16's):")
for m in rows["bfloat16"]:
    a, b = rows["float32"][m], rows["bfloat16"][m]
    pa, pb = a.get("projected_s") or a["wall_s"], b.get("projected_s") or b["wall_s"]
    print(f"  {m:<8} wall {a['wall_s'] / b['wall_s']:.2f}x  projected {pa / pb:.2f}x")
print("bench-attn, W=8, 32K, float32 (projected):")
for f in "abc":
    r = json.load(open(f"bench-attn-w8-32k-s35-bf16cpu{f}.json"))
    x = {y["method"]: y for y in r["results"]}
    ring, apb, spava = (x[m]["projected_s"] for m in ("ring", "apb", "spava"))
    ia, isp = x["apb"]["ideal_speedup_vs_ring"], x["spava"]["ideal_speedup_vs_ring"]
    print(f"  run {f}: ring {ring:.3f} s, apb {apb:.3f}, spava {spava:.3f}; apb vs ring {ring / apb:.2f} (ideal "
          f"{ia:.2f}, efficiency {ring / apb / ia:.2f}); spava vs apb {apb / spava:.2f} (ideal {isp / ia:.2f}, "
          f"efficiency {apb / spava / (isp / ia):.2f}); peak MiB, largest host: "
          f"{[round(max(x[m]['rank_peak_mem_mib'])) for m in ('ring', 'apb', 'spava')]}; rates drift {r['rates_drift']:.0%}")
