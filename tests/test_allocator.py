"""The worker's allocator setting (apb.runtime.allocator), against the system's own fault counter."""

import platform
import subprocess
import sys

import pytest

# In a fresh interpreter, one host's prefill (full, bench-attn, 4K tokens) run again and again, as
# a worker runs document after document: the minor page faults of each run after the first two
_PREFILLS = """
import resource, sys, torch
torch.set_num_threads(1)
from apb.runtime import allocator
applied = allocator.retain_freed_memory() if sys.argv[1] == "on" else None
from apb.config import MethodConfig
from apb.methods import build_method
from apb.model.catalog import resolve_model
from apb.model.loading import load_model
from apb.parallel.comm import Comm
from apb.runtime.prefill import prefill
from apb.tools.verify import random_prompt
model = load_model(resolve_model("bench-attn", 0), "float32", torch.device("cpu"))
ids = random_prompt(4096, model.config.vocab_size, seed=1)
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    prefill(model, ids, build_method("full", MethodConfig()), Comm(None), n_query=32)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *faults[2:])
"""


def _faults(mode: str) -> tuple[str, list[int]]:
    out = subprocess.run([sys.executable, "-c", _PREFILLS, mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    applied, *faults = out.stdout.split()
    return applied, [int(f) for f in faults]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's; elsewhere nothing is changed")
def test_memory_a_prefill_frees_is_reused_by_the_next_not_faulted_in_again():
    applied, retained = _faults("on")
    _, default = _faults("off")
    assert applied == "True"
    # with the C library's defaults each run maps and zeroes thousands of pages again (measured
    # here: 11-23K per run); kept, the runs after the first reuse what they freed
    assert sum(default) > 3 * 4096
    assert sum(retained) < sum(default) / 4
