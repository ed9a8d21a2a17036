# Session 20: how much of each host's CPU time in a bench-attn W=8 32K run the attention accounts
# for at the quiet kernel rates of call_rate.txt, and what is left (docs/results.md, "bench-attn,
# W = 8, 32K tokens"). Pairs per method come from the bench's own attention FLOPs of the slowest
# host (4 * head_dim FLOPs per query-key pair and head); the rate per pair is the mix of each
# method's calls at this shape: non-causal calls at 1.89 ns, causal ones by their size
# (call_rate.txt), weighted by the share of pairs each kind holds on the slowest host:
#   ring:  one 4,096-row causal call per chunk pair on the diagonal, the rest non-causal
#   apb:   its 4,096-row block causal (8.4M of 27.9M pairs per head), the 1,024-row anchor causal
#   spava: two 2,048-row virtual blocks causal (4.2M of 17.7M), the 512-row anchor causal
# Run: .venv/bin/python docs/results/bench13/attention_share.py FILE.json [FILE.json ...]
import json
import sys

HEAD_DIM = 64
NC = 1.89  # ns per pair and head, non-causal (call_rate.txt: 1.84-2.05)
CAUSAL = {4096: 2.25, 2048: 2.49, 1024: 3.04, 512: 4.43}
MIX = {  # method: [(share of pairs, ns per pair)]
    "ring": [(1 / 8, CAUSAL[4096]), (7 / 8, NC)],
    "apb": [(8.39 / 27.9, CAUSAL[4096]), (0.52 / 27.9, CAUSAL[1024]), (1 - 8.91 / 27.9, NC)],
    "spava": [(4.2 / 17.7, CAUSAL[2048]), (0.13 / 17.7, CAUSAL[512]), (1 - 4.33 / 17.7, NC)],
}

for path in sys.argv[1:]:
    print(path)
    for r in json.load(open(path))["results"]:
        m = r["method"]
        ns = sum(share * rate for share, rate in MIX[m])
        attn = r["attn_gflop_slowest_host"] * 1e9 / (4 * HEAD_DIM) * ns * 1e-9
        cpu = max(r["rank_compute_cpu_s"])
        print(f"  {m:6s} {ns:.2f} ns/pair  attention {attn:.2f} s of {cpu:.2f} s on the slowest host; rest {cpu - attn:.2f} s")
