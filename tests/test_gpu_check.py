"""`make gpu-check`'s plumbing on CPU: every stage runs, and writes what it measured into one JSON."""

import json
import subprocess
import sys


def test_gpu_check_plumbing_on_cpu(tmp_path):
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run([sys.executable, "-m", "apb.tools.gpu_check", "--device", "cpu", "--quick", "--json",
                           str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all stages passed" in proc.stdout
    report = json.loads(out.read_text())
    rows = {r["backend"]: r for r in report["kernels"]["rows"]}
    assert {"naive", "torch_flash"} <= set(rows)
    assert all(r["max_abs_out_diff"] < 1e-5 and r["max_abs_lse_diff"] < 1e-5 for r in rows.values())
    for world in ("W1", "W2"):
        verify = report["verify"][world]
        assert verify["exit"] == 0 and {r["method"] for r in verify["rows"]} >= {"full", "ring", "apb"}
        assert all(r["passed"] for r in verify["rows"])
    assert report["bench"]["exit"] == 0 and report["bench"]["report"] is not None
