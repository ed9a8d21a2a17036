# Session 30: the fuzz runs (fuzz.py) classified: per row of every `apb verify` run, an exact row
# that ran and did not match (a bug), an exact row refused with a reason (the input cannot run:
# no query for a query method, a context too short), an approximate row that ran or was refused,
# and runs that stopped without writing their rows (a crash, or a config refused up front).
# Run: .venv/bin/python docs/results/fuzz-s30/summary.py > docs/results/fuzz-s30/summary.txt
# (another fuzz's folder as an argument: docs/results/fuzz-s30/summary.py docs/results/fuzz-s31)
import json
import re
import sys
from collections import Counter
from pathlib import Path

HERE = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
rows, runs, stopped = Counter(), 0, []
mismatches, reasons = [], Counter()
for log in sorted((HERE / "runs").glob("*.log"), key=lambda p: [int(x) for x in p.stem.split("-")]):
    runs += 1
    out = log.with_suffix(".json")
    cmd = log.read_text().splitlines()[0]
    if not out.exists():
        last = [l for l in log.read_text().splitlines() if l.strip()][-1]
        stopped.append(f"{log.stem}: {last[:160]}\n      {cmd[cmd.index('verify'):]}")
        continue
    for r in json.loads(out.read_text())["results"]:
        kind = "exact" if r["exact_expected"] else "approximate"
        if r.get("error"):
            rows[f"{kind}, refused"] += 1
            reasons[re.sub(r"\d+", "N", r["error"])[:110]] += 1
        elif r["passed"]:
            rows[f"{kind}, ran and passed"] += 1
        else:
            rows[f"{kind}, ran and FAILED"] += 1
            if kind == "exact":
                mismatches.append(f"{log.stem} {r['model']} {r['method']} W={r['world_size']} n={r['prompt_len']}: "
                                  f"{r.get('reason')}\n      {cmd[cmd.index('verify'):]}")
print(f"{runs} verify runs, {runs - len(stopped)} wrote their rows")
for k, v in sorted(rows.items()):
    print(f"  {v:5d}  {k}")
print("exact rows that ran and did not match:" + ("" if mismatches else " none"))
for m in mismatches:
    print("  " + m)
print("refusals (numbers as N):")
for k, v in reasons.most_common():
    print(f"  {v:5d}  {k}")
print("runs that stopped without rows:" + ("" if stopped else " none"))
for s in stopped:
    print("  " + s)
