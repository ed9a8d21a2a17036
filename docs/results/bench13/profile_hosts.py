# Session 21: where each host's time goes in apb and spava at bench-attn's shape, W=8, 32K, float32
# (the bench's setting): torch's profiler around one prefill on every host (after a warm-up), the
# ops by self CPU time for the slowest host, and the attention kernel's share.
# Run: .venv/bin/python docs/results/bench13/profile_hosts.py 2>/dev/null > docs/results/bench13/profile_hosts.txt
# (8 processes share 2 cores: the profiler's times include waiting for a core, so read the shares,
# not the seconds; the layer clocks in the header count CPU time only)
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # the workers import ProfilingWorker from here

from apb.model.catalog import resolve_model  # noqa: E402
from apb.parallel.groups.local import LocalWorkerGroup  # noqa: E402
from apb.runtime.decode import Sampling  # noqa: E402
from apb.runtime.worker import PromptRequest, Worker  # noqa: E402
from apb.tools.verify import random_prompt  # noqa: E402

N, W, TOP = 32768, 8, 14


class ProfilingWorker(Worker):
    def profiled(self, req):
        self.run_prompt(req)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = self.run_prompt(req)
        rows = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
        rows.sort(key=lambda r: -r[1])
        return out.prefill_s, sum(x["cpu_s"] for x in out.stats["layer_cpu"]), rows


if __name__ == "__main__":
    ids = random_prompt(N, 512, seed=N)
    with LocalWorkerGroup(W, "profile_hosts:ProfilingWorker", {"device": "cpu", "timeout_s": 600, "threads": 1},
                          timeout_s=1200) as g:
        for method in ("ring", "apb", "spava"):
            req = PromptRequest(str(resolve_model("bench-attn", 0)), ids, method, n_query=32, dtype="float32",
                                sampling=Sampling(max_new_tokens=1), timed=True)
            replies = g.call("profiled", req)
            cpu = [r[1] for r in replies]
            slow = max(range(W), key=lambda r: cpu[r])
            print(f"\n== {method}: CPU s per host (layer clocks) {' '.join(f'{c:.3f}' for c in cpu)}; slowest host {slow}")
            rows = replies[slow][2]
            total = sum(r[1] for r in rows)
            print(f"   profiled self CPU on host {slow}: {total:.3f} s (profiler overhead included)")
            for key, s, count in rows[:TOP]:
                print(f"   {s:7.3f} s {100 * s / total:5.1f}%  {count:6d}x  {key}")
