"""The worker's allocator setting (apb.runtime.allocator), against the system's own fault counter."""

import platform
import subprocess
import sys

import pytest

# In a fresh interpreter: what a worker's tensors do over documents of growing length, each
# document's tensors a little larger than the last one's (8 to 23 MiB, under the 32 MiB the
# setting covers), each made, written in full and dropped; the minor page faults of it all.
# (A real prefill's count per run depends on where the heap happens to end, so it makes a flaky
# test: measured by `apb bench`'s rank_minor_faults instead, docs/results.md, session 26.)
_DOCUMENTS = """
import resource, sys, torch
from apb.runtime import allocator
applied = allocator.retain_freed_memory() if sys.argv[1] == "on" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for mib in range(8, 24):
    layer = [torch.empty(mib * 2**18) for _ in range(3)]  # float32: three tensors of mib MiB
    for t in layer:
        t.fill_(1.0)  # every page touched
    del layer
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
_PAGES_TOUCHED = 3 * sum(range(8, 24)) * 2**20 // 4096  # 3 x 248 MiB: 190K pages of 4 KiB


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _DOCUMENTS, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's; elsewhere nothing is changed")
def test_memory_a_document_frees_is_reused_by_the_next_not_faulted_in_again():
    applied, retained = _faults("on")
    _, default = _faults("off")
    assert applied == "True"
    # glibc's defaults map every size larger than the largest it has seen freed afresh: every
    # page of every document faulted in and zeroed by the system
    assert default > 0.9 * _PAGES_TOUCHED
    # kept: each document reuses what the last one freed and faults in little more than what
    # it adds (measured: 46-49K of the 190K pages)
    assert retained < 0.35 * _PAGES_TOUCHED
