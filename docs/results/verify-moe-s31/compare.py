# Session 31: the bfloat16 rule before (old/, d342f80) and after (new/) on models with experts:
# per model and prompt length, eager bfloat16's floor (the measure a row is held to twice of), and
# the exact rows' verdicts and worst K/V over W = 2-4.
# Run: python3 docs/results/verify-moe-s31/compare.py > docs/results/verify-moe-s31/compare.txt
import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
table = defaultdict(dict)
for tag in ("old", "new"):
    for f in sorted((HERE / tag).glob("*.json")):
        for r in json.loads(f.read_text())["results"]:
            key = (r["model"].split("/")[-1], r["prompt_len"])
            cell = table[key].setdefault(tag, {"floor": set(), "passed": 0, "rows": 0, "worst": 0.0, "left": 0})
            cell["floor"].add(round(r["floor_layer_rel"], 5))
            cell["rows"] += 1
            cell["passed"] += bool(r["passed"])
            cell["worst"] = max(cell["worst"], r["kv_layer_rel_diff"])
            cell["left"] = max(cell["left"], int(r["routing_flips"].split("method ")[1].split(" ")[0])
                               if r.get("routing_flips") and "method none" not in r["routing_flips"] else 0)
print(f"{'model':12s} {'n':>5s} | {'old floor':>9s} {'old pass':>8s} {'old worst':>9s} | {'new floor':>9s} "
      f"{'new pass':>8s} {'new worst':>9s} {'most tokens that took other experts (method)':>44s}")
for (model, n), c in sorted(table.items()):
    o, w = c["old"], c["new"]
    print(f"{model:12s} {n:5d} | {max(o['floor']):9.2e} {o['passed']:3d}/{o['rows']:<4d} {o['worst']:9.2e} | "
          f"{max(w['floor']):9.2e} {w['passed']:3d}/{w['rows']:<4d} {w['worst']:9.2e} {w['left']:44d}")
