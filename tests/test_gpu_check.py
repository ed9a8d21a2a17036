"""`make gpu-check`'s plumbing on CPU: every stage runs, and writes what it measured into one JSON."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from apb.config import ConfigError, load_config
from apb.engine import start_group
from apb.parallel.rendezvous import pick_device
from apb.runtime.memory import device_budget
from apb.tools import gpu_check


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
    speed = report["kernels"]["speed"]
    assert speed["window"] == speed["n"] // 8 and speed["window_sdpa_ms"] > 0
    assert all(speed[f"{name}_window_ms"] > 0 for name in ("naive", "torch_flash"))
    for world in ("W1", "W2"):
        verify = report["verify"][world]
        assert verify["exit"] == 0 and {r["method"] for r in verify["rows"]} >= {"full", "ring", "apb"}
        assert {r["model"] for r in verify["rows"]} == set(gpu_check.VERIFY_MODELS.split(","))
        assert all(r["passed"] for r in verify["rows"])
        experts = report["verify"][f"{world}-experts"]
        assert experts["exit"] == 0 and {r["model"] for r in experts["rows"]} == {gpu_check.EXPERTS_MODEL}
        assert all(r["passed"] for r in experts["rows"]) and {r["method"] for r in experts["rows"]} >= {"full", "ring"}
    assert report["bench"]["exit"] == 0 and report["bench"]["report"] is not None
    baseline = report["baseline"]
    assert baseline["exit"] == 0 and {r["method"] for r in baseline["rows"]} == {"full", "hf-sdpa"}
    assert set(baseline["full_over_transformers"]) == {"512"} and baseline["full_over_transformers"]["512"] > 0


def _gpus(monkeypatch, count):
    """This process sees ``count`` CUDA devices (of 80 GiB), as far as these helpers ask."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * 2**30))


def test_one_gpu_runs_two_ranks_shared_and_leaves_out_ulysses(monkeypatch):
    _gpus(monkeypatch, 1)
    sets, methods = gpu_check._placement("cuda", 2, gpu_check.METHODS)
    assert sets == ["--set", "parallel.device=cuda", "--set", "parallel.share_gpus=true"]
    assert methods.split(",") == [m for m in gpu_check.METHODS.split(",") if m != "ulysses"]
    assert gpu_check._placement("cuda", 1, gpu_check.METHODS) == (["--set", "parallel.device=cuda"], gpu_check.METHODS)
    _gpus(monkeypatch, 2)
    assert gpu_check._placement("cuda", 2, gpu_check.METHODS) == (["--set", "parallel.device=cuda"], gpu_check.METHODS)
    assert not gpu_check.shares_gpu("cpu", 2)


def test_the_check_runs_at_the_gpu_count_where_there_are_several(monkeypatch):
    """One GPU: W = 1 and 2 (shared); 2-3 GPUs: the bench on all of them; 4-8: verify too;
    more: capped at 8. On CPU: 1 and 2."""
    assert gpu_check.worlds("cpu") == ((1, 2), 2)
    for count, expected in ((1, ((1, 2), 2)), (2, ((1, 2), 2)), (3, ((1, 2), 3)), (4, ((1, 2, 4), 4)),
                            (8, ((1, 2, 8), 8)), (16, ((1, 2, 8), 8))):
        _gpus(monkeypatch, count)
        assert gpu_check.worlds("cuda") == expected, count


def test_shared_gpus_place_ranks_round_robin_and_split_the_memory(monkeypatch):
    _gpus(monkeypatch, 2)
    placed = [pick_device(r, "cuda", share_gpus=True) for r in range(5)]
    assert placed == [torch.device("cuda", i) for i in (0, 1, 0, 1, 0)]
    with pytest.raises(RuntimeError, match="share_gpus"):  # without it, a rank beyond the GPUs is refused
        pick_device(2, "cuda")
    assert device_budget("cuda", 4, "local", None) == 80 * 2**30
    assert device_budget("cuda", 4, "local", None, share_gpus=True) == 40 * 2**30  # two ranks per GPU
    assert device_budget("cuda", 3, "local", None, share_gpus=True) == 40 * 2**30  # at most two on one
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "6")  # torchrun: 6 ranks on this node, of 12
    assert device_budget("cuda", 12, "torchrun", None, share_gpus=True) == 80 * 2**30 // 3


def test_shared_gpus_are_refused_under_ray():
    cfg = load_config(None, ["parallel.share_gpus=true", "parallel.launcher=ray"])
    with pytest.raises(ConfigError, match="share_gpus.*local and torchrun"):
        start_group(cfg)


def test_ulysses_refuses_ranks_that_share_a_gpu():
    """On a staged group (ranks sharing a GPU, over gloo) with tensors off the CPU (the meta device
    stands in for CUDA) ulysses stops before DeepSpeed's all-to-all, naming the fix."""
    from apb.config import MethodConfig
    from apb.methods import build_method

    method = build_method("ulysses", MethodConfig(name="ulysses"))
    comm = SimpleNamespace(size=2, rank=0, group=None, staged=lambda device: True)
    ctx = SimpleNamespace(comm=comm, score_opts={}, scratch={})
    q, k, v = (torch.empty(1, h, 8, 16, device="meta") for h in (4, 2, 2))
    with pytest.raises(RuntimeError, match="share a GPU.*own GPU"):
        method.attention(ctx, SimpleNamespace(layer_idx=0), q, k, v, 0.25)


def test_the_sync_census_says_where_and_in_which_method(tmp_path):
    """The census hook (CUDA's sync debug mode is stood in for by warning by hand): a sync inside
    a prefill's model forward is counted for its method, a staged one (under comm.py) apart, one
    outside the model apart, and decode's apart; each with the line that made it."""
    pkg = tmp_path / "pkg"
    (pkg / "runtime").mkdir(parents=True)
    (pkg / "parallel").mkdir()
    models = tmp_path / "transformers" / "models"
    models.mkdir(parents=True)
    sync = "warnings.warn('called a synchronizing CUDA operation')"
    (models / "fake.py").write_text("def forward(step):\n    step()\n")
    (pkg / "parallel" / "comm.py").write_text(f"import warnings\ndef staged():\n    {sync}\n")
    (pkg / "runtime" / "prefill.py").write_text(
        "import warnings, sys\n"
        f"sys.path[:0] = [{str(models)!r}, {str(pkg / 'parallel')!r}]\n"
        "import fake, comm\n"
        f"def step():\n    {sync}\n"
        "def prefill(method):\n"
        "    fake.forward(step); fake.forward(step); fake.forward(comm.staged); fake.forward(_fused_ok)\n"
        f"    {sync}\n"
        f"def _fused_ok():\n    {sync}\n")
    (pkg / "runtime" / "decode.py").write_text(f"import warnings\ndef decode():\n    {sync}\n")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(gpu_check.CENSUS_HOOK)
    records = tmp_path / "records"
    records.mkdir()
    script = ("import sys, types; sys.path.insert(0, %r)\n"
              "import prefill, decode\n"
              "prefill.prefill(types.SimpleNamespace(label='apb')); decode.decode()\n") % str(pkg / "runtime")
    env = {"PATH": "/usr/bin:/bin", "APB_SYNC_CENSUS": str(records), "APB_SYNC_CENSUS_ROOTS": str(pkg),
           "APB_SYNC_CENSUS_TEST": "1", "PYTHONPATH": str(hook)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = gpu_check.census_summary(gpu_check._read_census(records))
    apb = summary["apb"]
    assert apb["in_model_unstaged"] == {"count": 2, "sites": {"pkg/runtime/prefill.py:5 step": 2}}
    assert apb["in_model_staged"] == {"count": 1, "sites": {"pkg/parallel/comm.py:3 staged": 1}}
    assert apb["prefill_outside_model"] == {"count": 1, "sites": {"pkg/runtime/prefill.py:8 prefill": 1}}
    assert apb["kernel_probes"] == {"count": 1, "sites": {"pkg/runtime/prefill.py:10 _fused_ok": 1}}
    assert summary["(decode)"]["decode"]["count"] == 1
    # only the syncs inside the forward that are neither staged nor a probe fail the check
    assert gpu_check.census_findings(summary) == ["apb: 2 sync(s) inside the forward, at "
                                                  "pkg/runtime/prefill.py:5 step (2)"]
    del summary["apb"]["in_model_unstaged"]
    assert gpu_check.census_findings(summary) == []
    # without the census variables the hook does nothing
    plain = subprocess.run([sys.executable, "-c", script], env={**env, "APB_SYNC_CENSUS": ""}, capture_output=True,
                           text=True, timeout=120)
    assert plain.returncode == 0 and "synchronizing" in plain.stderr and len(list(records.iterdir())) == 1


def test_a_command_gets_what_is_left_of_the_budget():
    assert gpu_check._apb(["--help"], 1.0)[0] == 124  # nothing left: not started
    rc, tail = gpu_check._apb(["verify", "--methods", "full,ring", "--world-size", "2", "--prompt-len", "65536"], 6.0)
    assert rc == 124 and "cut short after 6 s" in tail


def test_a_kernel_off_the_naive_softmax_fails_the_kernels_stage(monkeypatch):
    """The kernels stage is a gate: a backend whose LSE is off (as a wrong convention would make
    it) fails its rows and the stage; the same stage passes unchanged."""
    assert gpu_check.kernels_stage("cpu", quick=True)["exit"] == 0
    real = gpu_check.attention

    def off(q, k, v, backend=None, **kw):
        out, lse = real(q, k, v, backend=backend, **kw)
        return (out, lse * 1.4427) if backend == "torch_flash" else (out, lse)  # base 2, not e
    monkeypatch.setattr(gpu_check, "attention", off)
    report = gpu_check.kernels_stage("cpu", quick=True)
    assert report["exit"] == 1
    assert {r["backend"] for r in report["rows"] if not r["passed"]} == {"torch_flash"}


def test_rows_that_see_no_key_must_come_back_empty_on_every_backend(monkeypatch):
    """flash-attn's kernel writes lse = +inf for a row that sees no key (a window with fewer keys
    than queries); a backend that let it through would turn merges into NaN. The windowed cases
    are in the stage, and such a backend fails exactly those rows."""
    real = gpu_check.attention

    def plus_inf(q, k, v, backend=None, **kw):
        out, lse = real(q, k, v, backend=backend, **kw)
        return (out, lse.masked_fill(torch.isneginf(lse), float("inf"))) if backend == "torch_flash" else (out, lse)
    monkeypatch.setattr(gpu_check, "attention", plus_inf)
    report = gpu_check.kernels_stage("cpu", quick=True)
    assert report["exit"] == 1
    failed = [(r["backend"], r["case"]) for r in report["rows"] if not r["passed"]]
    assert failed == [("torch_flash", "window 128, fewer keys")]
    assert {r["case"] for r in report["rows"]} >= {"window 128", "window 128, fewer keys"}


def test_full_slower_than_transformers_on_a_gpu_fails_the_baseline_stage(monkeypatch, tmp_path):
    """What found session 25's kernel gap is a gate on a GPU: full over 1.1x transformers' own
    forward at any length fails the stage and says where; at parity it passes."""
    def fake_bench(full_s):
        def run(args, timeout_s, env=None):
            rows = [{"method": m, "length": n, "wall_s": s} for n in (32768, 65536)
                    for m, s in (("full", full_s * n / 32768), ("hf-sdpa", 0.1 * n / 32768))]
            Path(args[args.index("--json") + 1]).write_text(json.dumps({"results": rows}))
            return 0, ""
        return run
    monkeypatch.setattr(gpu_check, "_apb", fake_bench(0.2))
    out = gpu_check.baseline_stage("cuda", False, tmp_path, gpu_check.Deadline(100))
    assert out["exit"] == 4 and out["full_over_transformers"] == {"32768": 2.0, "65536": 2.0}
    assert "32768 tokens (2.00x)" in out["finding"]
    monkeypatch.setattr(gpu_check, "_apb", fake_bench(0.097))
    assert gpu_check.baseline_stage("cuda", False, tmp_path, gpu_check.Deadline(100))["exit"] == 0
