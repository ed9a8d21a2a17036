# Per document: each method's answer with its anchor shared against its answer without, the
# first answer token's lead (logit margin) in both, and the prefill wall times.
# Run: .venv/bin/python docs/results/shared-anchor/compare.py > docs/results/shared-anchor/compare.txt
# and for spava's split anchor (session 24, run-spava.sh):
# .venv/bin/python docs/results/shared-anchor/compare.py passkey-4096-w4-spava.json spava:unshared,spava:shared \
#   > docs/results/shared-anchor/compare-spava.txt
# and for apb's split anchor (session 27, run-split.sh): passkey-4096-w4-apb-split.json apb:unshared,apb:split
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent
REPORT = sys.argv[1] if len(sys.argv) > 1 else "passkey-4096-w4.json"
# (without, with) the anchor shared
PAIRS = [tuple(a.split(",")) for a in sys.argv[2:]] or [("apb", "apb:shared"), ("star", "star:shared")]
docs = [json.loads(line) for line in (HERE / f"{REPORT}.docs.jsonl").read_text().splitlines()]
for base, shared in PAIRS:
    same = sum(d["answers"][base]["answer"] == d["answers"][shared]["answer"] for d in docs)
    right = [sum(bool(d["answers"][m]["correct"]) for d in docs) for m in (base, shared)]
    lead_gap = max(abs(d["answers"][base]["lead"] - d["answers"][shared]["lead"]) for d in docs)
    speed = statistics.median(d["answers"][base]["prefill_s"] / d["answers"][shared]["prefill_s"] for d in docs)
    for d in docs:
        if d["answers"][base]["answer"] != d["answers"][shared]["answer"]:
            print(f"  {d['id']}: {d['answers'][base]['answer']!r} | shared: {d['answers'][shared]['answer']!r}")
    print(f"{base}: {same}/{len(docs)} answers word for word alike; correct {right[0]} without, {right[1]} with the "
          f"anchor shared; largest lead difference {lead_gap:.4f}; prefill wall (4 processes on 2 cores) "
          f"{speed:.2f}x faster shared (median)")
