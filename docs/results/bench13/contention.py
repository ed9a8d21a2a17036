"""Does one core slow down when the other core works too? transformers' own forward of
SmolLM2-135M (bfloat16, one thread, 4,096 random tokens), timed alone and then as two copies
at once on the two cores. Run: .venv/bin/python docs/results/bench13/contention.py"""
import subprocess
import sys
import time

CHILD = r"""
import time, torch
torch.set_num_threads(1)
from apb.model.catalog import resolve_model
from apb.model.loading import load_model
m = load_model(resolve_model("smollm2-135m-instruct"), "bfloat16", "cpu", attn_implementation="sdpa")
ids = torch.randint(0, 49152, (1, 4096), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    m(ids, use_cache=True, logits_to_keep=1)
    import sys; sys.stdout.write("ready\n"); sys.stdout.flush(); sys.stdin.readline()
    walls = []
    for _ in range(3):
        t = time.perf_counter(); m(ids, use_cache=True, logits_to_keep=1); walls.append(time.perf_counter() - t)
print(sorted(walls)[1])
"""


def run(copies: int) -> list[float]:
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(copies)]
    for p in procs:  # loaded and warm: start the timed runs together
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    return [float(p.communicate()[0].strip()) for p in procs]


if __name__ == "__main__":
    alone = run(1)[0]
    pair = run(2)
    print(f"one process alone: {alone:.2f} s; two at once: {pair[0]:.2f} s and {pair[1]:.2f} s "
          f"({max(pair) / alone:.2f}x slower)")
