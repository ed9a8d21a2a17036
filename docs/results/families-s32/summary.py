"""One line per family from verify.sh's rows and logs.

    python docs/results/families-s32/summary.py RUNS_DIR MADE_JSON [RUNS_DIR2 MADE_JSON2 ...] > summary.txt

A family made again in a later pair (sizes corrected) is reported from that pair.

Classes:
  exact      every row ran and passed (exact methods matched eager)
  MISMATCH   an exact row ran and did not match eager (a silent difference: the worst kind)
  refused    verify or the engine refused the model before any method ran, with a message
  row-error  rows were refused one by one (the message of the first)
  crashed    no rows: the log's last error line (apb's or transformers' own; see the log)
  not built  make.py could not build a checkpoint (a limit of that script)
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path


def last_error(log: Path) -> str:
    if not log.exists():
        return "no log"
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln) or ln.startswith("apb: error") or "error:" in ln[:40]:
            return ln[:300]
    return (lines[-1][:300] if lines else "empty log")


def classify(runs: Path, name: str) -> tuple[str, str]:
    out = runs / f"{name}.json"
    if not out.exists():
        return "crashed", last_error(runs / f"{name}.log")
    rows = json.loads(out.read_text())["results"]
    ran = [r for r in rows if not r.get("error")]
    bad = [r for r in ran if r.get("exact_expected") and not r.get("passed")]
    if bad:
        worst = ", ".join(f"{r['method']}: dlogit {r['max_abs_logit_diff']:.2g}, kv {r['kv_max_abs_diff']:.2g}"
                          f"{'' if r['tokens_match'] else ', tokens differ'}" for r in bad)
        return "MISMATCH", worst
    if not ran:
        return "refused", (rows[0].get("error") or "")[:300] if rows else "no rows"
    errors = [r for r in rows if r.get("error")]
    if errors:
        return "row-error", f"{len(errors)} of {len(rows)} rows: {errors[0]['method']}: {errors[0]['error'][:240]}"
    worst = max(r["max_abs_logit_diff"] for r in ran)
    return "exact", f"{len(ran)} rows, max dlogit {worst:.2g}"


def main() -> None:
    rows = {}
    for runs, made in zip(sys.argv[1::2], sys.argv[2::2]):
        for name, how in json.loads(Path(made).read_text()).items():
            if how.startswith("made"):
                rows[name] = classify(Path(runs), name)
            elif name not in rows or rows[name][0] == "not built":
                rows[name] = ("not built", how)
    counts = Counter()
    for name in sorted(rows):
        cls, what = rows[name]
        counts[cls] += 1
        print(f"{name:28s} {cls:10s} {what}")
    print()
    print(", ".join(f"{k}: {v}" for k, v in counts.most_common()))


if __name__ == "__main__":
    main()
