# Per document: each method's answer with its anchor shared against its answer without, the
# first answer token's lead (logit margin) in both, and the prefill wall times.
# Run: .venv/bin/python docs/results/shared-anchor/compare.py > docs/results/shared-anchor/compare.txt
# and for spava's split anchor (session 24, run-spava.sh):
# .venv/bin/python docs/results/shared-anchor/compare.py passkey-4096-w4-spava.json spava:unshared,spava:shared \
#   > docs/results/shared-anchor/compare-spava.txt
# and for apb's split anchor (session 27, run-split.sh): passkey-4096-w4-apb-split.json apb:unshared,apb:split
# A method written METHOD@REPORT is read from that other report (the same documents, by id): an
# answer from an earlier commit against today's (session 28, run-s28-spava.sh).
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent
REPORT = sys.argv[1] if len(sys.argv) > 1 else "passkey-4096-w4.json"
# (without, with) the anchor shared
PAIRS = [tuple(a.split(",")) for a in sys.argv[2:]] or [("apb", "apb:shared"), ("star", "star:shared")]


def load(report):
    return {d["id"]: d for d in map(json.loads, (HERE / f"{report}.docs.jsonl").read_text().splitlines())}


reports = {REPORT: load(REPORT)}
docs = list(reports[REPORT].values())


def answer(d, method):
    """``method``'s answer to document ``d`` (from another report where it says ``@REPORT``)."""
    if "@" not in method:
        return d["answers"][method]
    name, report = method.split("@")
    if report not in reports:
        reports[report] = load(report)
    return reports[report][d["id"]]["answers"][name]


for base, shared in PAIRS:
    a, b = [[answer(d, m) for d in docs] for m in (base, shared)]
    same = sum(x["answer"] == y["answer"] for x, y in zip(a, b))
    right = [sum(bool(x["correct"]) for x in side) for side in (a, b)]
    lead_gap = max(abs(x["lead"] - y["lead"]) for x, y in zip(a, b))
    speed = statistics.median(x["prefill_s"] / y["prefill_s"] for x, y in zip(a, b))
    for d, x, y in zip(docs, a, b):
        if x["answer"] != y["answer"]:
            print(f"  {d['id']}: {x['answer']!r} | {shared}: {y['answer']!r}")
    print(f"{base} against {shared}: {same}/{len(docs)} answers word for word alike; correct {right[0]} and "
          f"{right[1]}; largest lead difference {lead_gap:.4f}; prefill wall (4 processes on 2 cores) "
          f"{speed:.2f}x faster with the second (median)")
