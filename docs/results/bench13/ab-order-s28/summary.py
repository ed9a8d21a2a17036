# Per run: apb's projected and fastest-of seconds, host 7's and the mean host's CPU seconds
# (medians over the repeats), old order against new (see run.sh).
import json
import statistics as st
from pathlib import Path

HERE = Path(__file__).parent
for run in range(1, 6):
    line = f"run {run}:"
    for mode in ("old", "new"):
        r = json.load(open(HERE / f"ab-{mode}-{run}.json"))["results"][0]
        tot = [[sum(x[2] for x in rank) for rank in rep] for rep in r["rank_layer_cpu_s_by_repeat"]]
        host7 = st.median(t[7] for t in tot)
        mean = st.mean(st.median(t[k] for t in tot) for k in range(8))
        line += (f"  {mode}: projected {r['projected_s']:.3f} fastest {r['projected_fastest_s']:.3f} host 7 cpu "
                 f"{host7:.3f} mean host {mean:.3f}")
    print(line)
