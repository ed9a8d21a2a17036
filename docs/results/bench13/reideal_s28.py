# Session 28: the ideal of earlier bench reports recomputed with the cost formulas' slowest host
# picked at the report's own measured rates (apb.methods.cost.slowest), where it was picked by
# FLOPs before; the measured seconds are the reports' own. Prints, per row whose pick changed:
# GFLOP (attention, linear) and ideal seconds before and after, and the efficiency vs ring.
# The sizes are the methods' as they are now (a report's config leaves defaults unset), so only
# rows whose variant names its anchor mode (apb:shared, apb:split), or reports made with today's
# defaults (session 27's issue runs), mean anything here; session 27's "-all" reports ran a first
# version of the split the formula no longer describes.
# Run: .venv/bin/python docs/results/bench13/reideal_s28.py \
#        docs/results/bench13/bench-smollm2-8k-w8-s27-split-b.json docs/results/bench13/bench-attn-w8-32k-s27-issue-*.json \
#        > docs/results/bench13/reideal_s28.txt
import json
import sys

import yaml
from transformers import AutoConfig

from apb.config import MethodConfig
from apb.model.catalog import resolve_model
from apb.tools.bench import _model_flop
from apb.tools.calibrate import Rates

for name in sys.argv[1:]:
    try:
        report = json.load(open(name))
        cfg = yaml.safe_load(open(name + ".config.yaml"))
    except (OSError, ValueError):
        continue
    if not isinstance(report, dict) or not report.get("rates") or "results" not in report:
        continue
    rates = Rates(**report["rates"])
    model_config = AutoConfig.from_pretrained(resolve_model(report["model"], cfg["model"].get("seed", 0)))
    method_cfg = MethodConfig(**{k: v for k, v in cfg["method"].items() if k != "name"})
    rows = [r for r in report["results"] if "error" not in r and r["method"] != "hf-sdpa"]
    ring = {r["length"]: r for r in rows if r["method"] == "ring"}
    for r in rows:
        before = (r["attn_gflop_slowest_host"], r["linear_gflop_slowest_host"])
        after = _model_flop(r["method"], r["length"], r["world_size"], model_config, 32, method_cfg, rates)
        if abs(after[0] - before[0]) > 1e-9 or abs(after[1] - before[1]) > 1e-9:
            ideal0, ideal1 = rates.seconds(*before), rates.seconds(*after)
            line = (f"{name.split('/')[-1]:<48} {r['method']:<12} n={r['length']:<6} W={r['world_size']}  GFLOP "
                    f"{before[0]:.2f}/{before[1]:.2f} -> {after[0]:.2f}/{after[1]:.2f}  ideal {ideal0:.3f} -> "
                    f"{ideal1:.3f} s  projected {r['projected_s']:.3f} s")
            ref = ring.get(r["length"])
            if ref is not None:
                ring_ideal = rates.seconds(ref["attn_gflop_slowest_host"], ref["linear_gflop_slowest_host"])
                speed = ref["projected_s"] / r["projected_s"]
                line += f"  efficiency vs ring {speed / (ring_ideal / ideal0):.3f} -> {speed / (ring_ideal / ideal1):.3f}"
            print(line)
        else:
            print(f"{name.split('/')[-1]:<48} {r['method']:<12} n={r['length']:<6} W={r['world_size']}  the same host")
