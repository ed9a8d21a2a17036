# Each rank's CPU seconds per prefill (its layer clocks summed), per repeat, without and with the
# gate; the spread is (slowest rank - fastest rank) / mean for the balanced methods (ring, spava).
import json
from pathlib import Path

HERE = Path(__file__).parent
for name in ("base1", "gate1"):
    d = json.loads((HERE / f"{name}.json").read_text())
    print(f"== {name}: projected s " + ", ".join(f"{r['method']} {r['projected_s']:.3f}" for r in d["results"]))
    for r in d["results"]:
        for k, rep in enumerate(r["rank_layer_cpu_s_by_repeat"]):
            tot = [sum(x[2] for x in rank) for rank in rep]
            mean = sum(tot) / len(tot)
            print(f"   {r['method']:<6} repeat {k}: " + " ".join(f"{t:.3f}" for t in tot)
                  + f"   spread {(max(tot) - min(tot)) / mean:.1%}")
