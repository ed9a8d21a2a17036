"""Counts for fuzz-39.txt from each run's JSON rows (runs/39-K.json) and the run lines.
Run from this folder: python3 summarize.py > summary-counts.txt"""
import json
import re
from collections import Counter
from pathlib import Path

lines = [ln for ln in Path("fuzz-39.txt").read_text().splitlines() if re.match(r"\s*\d+ rc=", ln)]
failed, no_json, ran_all, refused_runs = [], [], Counter(), Counter()
reasons = Counter()
for ln in lines:
    k = int(ln.split()[0])
    model = ln.split()[3]
    path = Path(f"runs/39-{k}.json")
    if not path.exists():
        no_json.append(ln)
        continue
    rows = json.loads(path.read_text())
    if isinstance(rows, dict):
        rows = rows.get("rows", rows.get("results"))
    refused = [r for r in rows if r.get("error")]
    for r in rows:
        if r.get("exact_expected") and not r.get("passed") and not r.get("error"):
            failed.append((k, r.get("method"), r.get("reason")))
    if refused:
        why = refused[0]["error"]
        kind = ("no query (q = 0)" if "n_query >= 1" in why else
                "context too short for the layout" if "context tokens" in why or "cannot be split" in why else why[:100])
        reasons[kind] += 1
        refused_runs[model] += 1
    else:
        ran_all[model] += 1
print(f"runs: {len(lines)}")
print(f"exact rows that ran and did not pass: {len(failed)} {failed}")
print(f"runs without JSON (crash, hang): {len(no_json)}")
for ln in no_json:
    print("   ", ln[:200])
print(f"runs whose every row ran: {sum(ran_all.values())} {dict(ran_all.most_common())}")
print(f"runs with rows refused by name: {sum(refused_runs.values())} {dict(reasons.most_common())}")
