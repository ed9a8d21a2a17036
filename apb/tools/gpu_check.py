"""``make gpu-check``: one run that says whether the GPU hot path works here, and how fast.

Stages, each recorded in one JSON file as soon as it ends (a failing stage is recorded with its
error and the others still run; a run stopped from outside keeps the stages it finished):

1. ``kernels``: every attention backend available on the device (flash-attn, torch's, the naive
   reference) on the same bfloat16 inputs (GQA; causal, causal with more keys, not causal, a
   window with as many keys as queries and with fewer), against ``naive`` in float32: largest
   output and LSE differences, each within :data:`KERNEL_TOLERANCE`, and ``lse = -inf`` on exactly
   the rows that see no key, or the stage fails; then each
   one's speed at 32K tokens beside ``F.scaled_dot_product_attention``, causal and as a sliding
   layer of window 4096 (called as apb's sliding layers call it), and which of torch's kernels ran
   (the probes' answers);
2. ``verify``: ``apb verify`` for every method at W=1, and at W=2, on :data:`VERIFY_MODELS` (one of
   them all sliding layers), and apart on :data:`EXPERTS_MODEL` (``W1-experts``, ...); on a machine
   with one GPU the two ranks share it (``parallel.share_gpus``: NCCL refuses two ranks on one
   device, so they talk over gloo through host copies, and ulysses, whose all-to-all needs NCCL, is
   left out). On CUDA
   the workers run under torch's sync debug mode and every host-device synchronization is
   recorded where it happened (:data:`CENSUS_HOOK`): ``syncs`` says, per method, how many fell
   inside a prefill's layers and were not the staged copies a shared GPU needs nor a one-time
   probe (the kernels', and RoPE's per model); the hot path's promise is none, so any
   (``sync_findings``) fails the stage;
3. ``baseline``: ``full`` at W=1 against transformers' own forward (``--hf-baseline``) on
   Llama-3.1-8B's layer shape at 32K-128K tokens, in bfloat16: the shared model path at
   transformers' speed, or not (``full_over_transformers``, per length; on a GPU over
   :data:`BASELINE_LIMIT` fails the stage);
4. ``bench``: ``apb bench`` (its default model, ``bench-attn``) for full, ring, apb and spava in
   bfloat16 at 32K-128K tokens at W=2 (W = the GPU count, up to 8, on a machine of 2 or more; verify
   then runs at that W too from 4), one length at a time
   (on one GPU, shared as above: the code runs on CUDA, but the two ranks' kernels take turns on
   one device, so the times are not those of two GPUs; ``shared_gpu`` says which it was).

The whole run keeps to ``--budget-s`` (8 minutes by default): each command gets what is left,
and what did not fit is recorded as cut short, not waited for.

``--device cpu --quick`` runs the same plumbing with small sizes on CPU (tests do).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import apb
import apb.kernels
import apb.parallel
from apb.kernels import attention, available_backends, windows_natively
from apb.methods import sliding
from apb.tools.calibrate import best_seconds

#: star:shared at W = 2 sends host 0's anchor to host 1 each layer: the broadcast on the device;
#: spava (its anchor split by default) gathers the anchor's shares with its passing blocks in one
#: flat buffer, spava:unshared does not
METHODS = "full,ring,ulysses,star,star:shared,apb,spava,spava:unshared"
BENCH_METHODS = "full,ring,apb,spava"
#: with --quick (the CPU plumbing check): fewer methods, one short length
QUICK_METHODS, QUICK_BENCH_METHODS, QUICK_LENGTHS = "full,ring,apb", "full,apb", "512"
#: the verify stage's models: plain GQA, and every layer sliding (window 64), so the sliding path
#: (flash-attn's own window, else torch's masked kernel) runs on the GPU under the sync census
VERIFY_MODELS = "tiny-llama,tiny-mistral-sliding"
#: verified apart, outside the census (transformers' own expert loop syncs on every layer): a model
#: with experts, attention sinks, YaRN and a sliding layer, where bfloat16 sends near-tied tokens to
#: other experts and the rule reads the hosts' routing (apb.tools.verify.HalfRule)
EXPERTS_MODEL = "tiny-gpt-oss"


#: the kernels' cases: (name, query length, key length, causal); 4096 scaled down with --quick
KERNEL_CASES = (("causal", 4096, 4096, True, None), ("causal, more keys", 1024, 4096, True, None),
                ("not causal", 1024, 4096, False, None),
                # a sliding layer's call (flash-attn's own window); with fewer keys than queries the
                # first rows see nothing, where flash-attn's kernel writes lse = +inf
                ("window 128", 4096, 4096, True, 128), ("window 128, fewer keys", 4096, 2048, True, 128))


#: largest differences from the naive float32 softmax a kernel may show (output, LSE), per input
#: dtype: bfloat16's rounding of outputs near 1 is 0.0078 (seen on the H200); a wrong mask or a
#: wrong LSE convention is off by far more
KERNEL_TOLERANCE = {"bfloat16": (0.05, 0.01), "float32": (1e-4, 1e-4)}


def kernels_stage(device: str, quick: bool) -> dict:
    """Each backend against naive float32, on bfloat16 inputs (float32 on CPU, where the fused
    kernels take what the model runs in), grouped heads, in the three kinds of call the methods
    make; then each backend's speed at a long causal call (the fastest of 5) beside what
    transformers' ``sdpa`` attention runs (``F.scaled_dot_product_attention``, no LSE), on the
    Llama-3.1-8B head shape."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    scale_down = 16 if quick else 1
    g = torch.Generator(device="cpu").manual_seed(0)
    backends = [b for b in available_backends() if b != "flash_attn" or device == "cuda"]
    rows = []
    for case, n_q, n_k, causal, window in KERNEL_CASES:
        n_q, n_k = n_q // scale_down, n_k // scale_down
        q = torch.randn(1, 8, n_q, 128, generator=g).to(device, dtype)
        k = torch.randn(1, 2, n_k, 128, generator=g).to(device, dtype)
        v = torch.randn(1, 2, n_k, 128, generator=g).to(device, dtype)
        opts = {} if window is None else {"window": window}
        ref_out, ref_lse = attention(q.float(), k.float(), v.float(), causal=causal, backend="naive", **opts)
        seen = torch.isfinite(ref_lse)
        for name in backends:
            out, lse = attention(q, k, v, causal=causal, backend=name, **opts)
            row = {"backend": name, "case": case, "dtype": str(dtype).removeprefix("torch."), "q_len": n_q,
                   "kv_len": n_k, "max_abs_out_diff": float((out.float() - ref_out).abs().max()),
                   "max_abs_lse_diff": float((lse - ref_lse)[seen].abs().max()),
                   # a row that sees no key must be -inf, the merges' identity, on every backend
                   "empty_rows_agree": bool(torch.equal(torch.isneginf(lse), ~seen))}
            tol_out, tol_lse = KERNEL_TOLERANCE[row["dtype"]]
            row["passed"] = (row["max_abs_out_diff"] <= tol_out and row["max_abs_lse_diff"] <= tol_lse
                             and row["empty_rows_agree"])
            rows.append(row)
    n = 1024 if quick else 32768
    q, k, v = (torch.randn(1, h, n, 128, generator=g).to(device, dtype) for h in (32, 8, 8))
    kernels = importlib.import_module("apb.kernels.attention")  # the module (the package exports the function)

    speed = {"n": n, "heads": 32, "kv_heads": 8, "head_dim": 128, "causal": True,
             "torch_kernel": kernels._torch_kernel(q),  # which of torch's kernels torch_flash runs here
             "sdpa_ms": 1e3 * best_seconds(lambda: _sdpa(q, k, v), 5, torch.device(device))}
    for name in backends:
        if name != "naive":
            speed[f"{name}_ms"] = 1e3 * best_seconds(lambda: attention(q, k, v, causal=True, backend=name), 5,
                                                     torch.device(device))
            speed[f"{name}_vs_sdpa"] = speed[f"{name}_ms"] / speed["sdpa_ms"]
    # a sliding layer's attention (window 4096, as Mistral's) the way apb's sliding layers call the
    # kernels on a host holding the whole prompt, per backend (naive: where the masked kernel's probe
    # fails), beside what transformers' sdpa runs for it (a dense band mask)
    window = n // 8
    band = torch.arange(n, device=device)
    band = (band[:, None] >= band[None, :]) & (band[:, None] - band[None, :] < window)
    speed["window"] = window
    speed["window_sdpa_ms"] = 1e3 * best_seconds(lambda: _sdpa(q, k, v, band), 5, torch.device(device))
    del band
    for name in backends:
        speed[f"{name}_window_ms"] = 1e3 * best_seconds(lambda: _sliding_layer(q, k, v, window, name), 3,
                                                        torch.device(device))
    probes = {"gqa_native": {"/".join(k): v for k, v in kernels._GQA_NATIVE.items()},
              "fused_agrees": {f"{d}/{str(t).removeprefix('torch.')}/{kernel}": v
                               for (d, t, kernel), v in kernels._FUSED_OK.items()},
              # whether torch's masked kernel (CUDA: the memory-efficient one with a bias) runs the
              # windowed and position-masked calls, or they stay on the naive softmax
              "masked_agrees": {f"{d}/{str(t).removeprefix('torch.')}": v for (d, t), v in kernels._MASKED_OK.items()}}
    passed = all(r["passed"] for r in rows)
    return {"exit": 0 if passed else 1, "rows": rows, "speed": speed, "probes": probes}


def _sdpa(q, k, v, mask=None):
    """What transformers' ``sdpa`` attention runs for a causal call with grouped heads (or one under
    a boolean ``mask``, as for a sliding layer)."""
    causal = dict(is_causal=True) if mask is None else dict(attn_mask=mask)
    try:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True, **causal)
    except TypeError:  # torch < 2.5 has no enable_gqa: transformers repeats K/V there
        rep = q.shape[1] // k.shape[1]
        return torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1),
                                                                v.repeat_interleave(rep, 1), **causal)


def _sliding_layer(q, k, v, window: int, backend: str) -> None:
    """One sliding layer's attention as :mod:`apb.methods.sliding` calls the kernels on a host that
    holds the whole prompt: aligned tiles of its ``_TILE`` rows over the keys they may see, or the
    whole prompt in one call where the kernel windows itself."""
    n = q.shape[2]
    step = n if windows_natively(q, v.shape[-1], backend) else sliding._TILE
    for lo in range(0, n, step):
        hi, first = min(n, lo + step), max(0, lo - window + 1)
        attention(q[:, :, lo:hi], k[:, :, first:hi], v[:, :, first:hi], causal=True, window=window, backend=backend)


class Deadline:
    """The run's time budget: each command is given what is left of it."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def _apb(args: list[str], timeout_s: float, env: dict | None = None) -> tuple[int, str]:
    """Run ``apb ARGS``; (exit code, the output's tail); 124 when it outran ``timeout_s``."""
    if timeout_s < 5:
        return 124, "not started: the run's time budget is spent"
    # its own process group, so that a command cut short takes its workers with it
    proc = subprocess.Popen([sys.executable, "-m", "apb", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return 124, out[-4000:] + f"\n[cut short after {timeout_s:.0f} s: the run's time budget]"
    return proc.returncode, out[-4000:]


#: Installed as ``sitecustomize`` in every process of a census run (the driver and its spawned
#: workers): torch's sync debug mode turns each host-device synchronization into a warning, and
#: each warning becomes one JSON line saying where it happened. Never raises: a census must not
#: change what it watches.
CENSUS_HOOK = r"""
import json, os, sys, warnings

# the one-time probes: the kernels' (apb.kernels.attention) and RoPE's, per model (apb.model.rope)
PROBES = ("_fused_ok", "_native_gqa", "_masked_ok", "_layer_turns")

def _install():
    out, roots = os.environ.get("APB_SYNC_CENSUS"), os.environ.get("APB_SYNC_CENSUS_ROOTS", "")
    if not out:
        return
    import torch
    if not torch.cuda.is_available() and not os.environ.get("APB_SYNC_CENSUS_TEST"):
        return
    roots = tuple(r for r in roots.split(os.pathsep) if r)
    path = os.path.join(out, f"{os.getpid()}.jsonl")
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        try:
            frame, site, event = sys._getframe(1), None, {"prefill": False, "decode": False, "model": False,
                                                         "staged": False, "probe": False, "method": None}
            while frame is not None:
                name, code = frame.f_code.co_filename, frame.f_code.co_name
                if name.startswith(roots):
                    if site is None:
                        site = f"{os.path.relpath(name, os.path.dirname(roots[0]))}:{frame.f_lineno} {code}"
                    if name.endswith(os.path.join("runtime", "prefill.py")) and code == "prefill":
                        event["prefill"] = True
                        method = frame.f_locals.get("method")
                        event["method"] = getattr(method, "label", None)
                    elif name.endswith(os.path.join("runtime", "decode.py")):
                        event["decode"] = True
                    elif name.endswith("comm.py"):
                        event["staged"] = True
                    elif code in PROBES:
                        event["probe"] = True
                elif os.sep + "models" + os.sep in name and "transformers" in name:
                    event["model"] = True  # inside the model's forward (embedding, layers, head)
                frame = frame.f_back
            at = f"{os.path.basename(filename)}:{lineno}"  # where the warning names: torch's or a library's code
            event["site"] = at if site is None else site if filename.startswith(roots) else f"{site} [{at}]"
            with open(path, "a") as f:
                f.write(json.dumps(event) + "\n")
        except Exception:
            pass

    warnings.showwarning = record
    warnings.filterwarnings("always", message=".*synchronizing CUDA operation")
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")

try:
    _install()
except Exception:
    pass
"""


def census_env(work: Path) -> tuple[dict, Path]:
    """The environment for a census run (the hook on the path, a folder for its records)."""
    hook, records = work / "census-hook", work / f"census-{time.monotonic_ns()}"
    hook.mkdir(exist_ok=True)
    records.mkdir()
    (hook / "sitecustomize.py").write_text(CENSUS_HOOK)
    roots = [str(Path(m.__file__).parent) for m in (apb, apb.parallel, apb.kernels)]
    env = {**os.environ, "APB_SYNC_CENSUS": str(records), "APB_SYNC_CENSUS_ROOTS": os.pathsep.join(roots),
           "PYTHONPATH": os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return env, records


def census_summary(events: list[dict]) -> dict:
    """Per method, the prefill's synchronizations: inside the model's forward and not a staged
    copy (the hot path's promise is none), inside it staged (a shared GPU's host copies), and the
    rest of the prefill (layouts, the cache); decode's and the rest apart. Each with the sites that
    made them, most frequent first. "Staged" means under ``parallel/comm.py``: on a shared GPU
    (gloo) those are the host copies themselves; over NCCL any such sync would be a finding."""
    out: dict = {}
    for e in events:
        if not e.get("prefill"):
            kind = "decode" if e.get("decode") else "elsewhere"
            row = out.setdefault(f"({kind})", {})
        else:
            row = out.setdefault(e.get("method") or "?", {})
            kind = "kernel_probes" if e.get("probe") else \
                "in_model_unstaged" if e["model"] and not e["staged"] else \
                "in_model_staged" if e["model"] else "prefill_outside_model"
        entry = row.setdefault(kind, {"count": 0, "sites": {}})
        entry["count"] += 1
        entry["sites"][e["site"]] = entry["sites"].get(e["site"], 0) + 1
    for row in out.values():
        for entry in row.values():
            entry["sites"] = dict(sorted(entry["sites"].items(), key=lambda kv: -kv[1])[:12])
    return out


def census_findings(summary: dict) -> list[str]:
    """The census's breaches of the hot path's promise: syncs inside a method's model forward that
    are neither a shared GPU's staged copies nor a one-time probe (:data:`CENSUS_HOOK`'s ``PROBES``)."""
    return [f"{method}: {row['in_model_unstaged']['count']} sync(s) inside the forward, at "
            + ", ".join(f"{site} ({n})" for site, n in row["in_model_unstaged"]["sites"].items())
            for method, row in summary.items() if "in_model_unstaged" in row]


def _read_census(records: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(records.glob("*.jsonl")) for line in f.read_text().splitlines()
            if line.strip()]


def shares_gpu(device: str, world: int) -> bool:
    """Whether ``world`` ranks must share GPUs here (fewer GPUs than ranks)."""
    return device == "cuda" and torch.cuda.device_count() < world


def _placement(device: str, world: int, methods: str) -> tuple[list[str], str]:
    """The config overrides for ``world`` ranks on ``device``, and the methods that can run there."""
    sets = ["--set", f"parallel.device={device}"]
    if shares_gpu(device, world):
        sets += ["--set", "parallel.share_gpus=true"]
        methods = ",".join(m for m in methods.split(",") if m != "ulysses")  # its all-to-all needs NCCL
    return sets, methods


def worlds(device: str) -> tuple[tuple[int, ...], int]:
    """(the verify stage's world sizes, the bench's): W = 1 and 2 everywhere (two ranks share a
    lone GPU), and on a machine of 4 or more GPUs its GPUs too (up to 8), one rank per GPU over
    NCCL: the distributed speed a shared GPU cannot show."""
    gpus = min(8, torch.cuda.device_count()) if device == "cuda" else 0
    return ((1, 2, gpus) if gpus >= 4 else (1, 2)), max(2, gpus)


def verify_stage(device: str, quick: bool, work: Path, deadline: Deadline) -> dict:
    out = {}
    n = 301 if quick else 4097
    sizes = worlds(device)[0]
    for i, world in enumerate(sizes):
        sets, methods = _placement(device, world, QUICK_METHODS if quick else METHODS)
        path = work / f"verify-w{world}.json"
        env, records = census_env(work) if device == "cuda" else (None, None)
        # a share of what is left, so the later sizes and stages still get their turn
        rc, tail = _apb(["verify", "--model", VERIFY_MODELS, "--methods", methods, "--world-size", str(world),
                         "--prompt-len", str(n),
                         "--tokens", "4", "--dtype", "bfloat16" if device == "cuda" else "float32", *sets,
                         "--json", str(path)], deadline.left() * 0.5 / (len(sizes) - i) * (0.6 if i == 0 else 1), env)
        out[f"W{world}"] = {"exit": rc, "shared_gpu": shares_gpu(device, world), "methods": methods,
                            "rows": json.loads(path.read_text())["results"] if path.exists() else None,
                            "output_tail": tail}
        if records is not None:
            summary = census_summary(_read_census(records))
            findings = census_findings(summary)
            # a sync in the layer loop stalls the pipeline on every layer: a failure, not a note
            out[f"W{world}"].update(syncs=summary, sync_findings=findings, exit=rc or (3 if findings else 0))
        path = work / f"verify-experts-w{world}.json"
        rc, tail = _apb(["verify", "--model", EXPERTS_MODEL, "--methods", methods, "--world-size", str(world),
                         "--prompt-len", str(n), "--tokens", "4", "--dtype", "bfloat16" if device == "cuda" else "float32",
                         *sets, "--json", str(path)], deadline.left() * 0.25 / (len(sizes) - i))
        out[f"W{world}-experts"] = {"exit": rc, "shared_gpu": shares_gpu(device, world), "methods": methods,
                                    "rows": json.loads(path.read_text())["results"] if path.exists() else None,
                                    "output_tail": tail}
    return out


#: the baseline stage's model: Llama-3.1-8B's layer shape (2 layers), where the GPU's kernels
#: and the linear layers both weigh
BASELINE_MODEL = "bench-llama8b-2layer"
#: the issue's bound on ``full`` at W = 1 against transformers' own forward (a gate on a GPU only:
#: the CPU plumbing run's 512 tokens are over in milliseconds, where noise rules)
BASELINE_LIMIT = 1.1


def baseline_stage(device: str, quick: bool, work: Path, deadline: Deadline) -> dict:
    """``full`` at W = 1 beside transformers' own forward (``--hf-baseline``: ``sdpa``, the same
    device and dtype) at 32K-128K tokens: whether the one model path every method shares runs at
    transformers' speed on this device. (Session 25's first H200 run found it at half.)"""
    path = work / "baseline.json"
    rc, tail = _apb(["bench", "--model", "bench-attn" if quick else BASELINE_MODEL, "--methods", "full",
                     "--lengths", "512" if quick else "32768,65536,131072", "--world-size", "1", "--repeats",
                     "1" if quick else "3", "--hf-baseline", "--set", f"parallel.device={device}", "--set",
                     f"model.dtype={'bfloat16' if device == 'cuda' else 'float32'}", "--json", str(path)],
                    deadline.left() * 0.4)
    out: dict = {"exit": rc, "output_tail": tail, "rows": None}
    if path.exists():
        rows = json.loads(path.read_text())["results"]
        out["rows"] = rows
        walls = {(r["method"], r["length"]): r["wall_s"] for r in rows if "wall_s" in r}
        out["full_over_transformers"] = {str(n): walls[("full", n)] / walls[("hf-sdpa", n)] for m, n in walls
                                         if m == "full" and ("hf-sdpa", n) in walls}
        slow = {n: r for n, r in out["full_over_transformers"].items() if r > BASELINE_LIMIT}
        if slow and device == "cuda" and not quick:
            out.update(exit=rc or 4, finding=f"full at W=1 is more than {BASELINE_LIMIT}x transformers' forward at "
                                             + ", ".join(f"{n} tokens ({r:.2f}x)" for n, r in slow.items()))
    return out


def bench_stage(device: str, quick: bool, work: Path, deadline: Deadline) -> dict:
    """One ``apb bench`` per length, shortest first, so a length that outruns the budget keeps the
    ones before it; ``report`` is their rows in one report."""
    world = worlds(device)[1]
    sets, methods = _placement(device, world, QUICK_BENCH_METHODS if quick else BENCH_METHODS)
    lengths = (QUICK_LENGTHS if quick else "32768,65536,131072").split(",")
    out: dict = {"exit": 0, "world_size": world, "shared_gpu": shares_gpu(device, world), "report": None,
                 "lengths": {}}
    for length in lengths:
        path = work / f"bench-{length}.json"
        rc, tail = _apb(["bench", "--methods", methods, "--lengths", length, "--world-size", str(world),
                         "--repeats", "1" if quick else "3", *sets, "--set",
                         f"model.dtype={'bfloat16' if device == 'cuda' else 'float32'}", "--json", str(path)],
                        deadline.left())
        out["lengths"][length] = {"exit": rc, "output_tail": tail}
        out["exit"] = out["exit"] or rc
        if path.exists():
            report = json.loads(path.read_text())
            if out["report"] is None:
                out["report"] = report
            else:
                out["report"]["results"] += report["results"]
    return out


def environment(device: str) -> dict:
    """What ran the check: versions, the GPU, and which attention backends it offered."""
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
           "python": sys.version.split()[0], "backends": available_backends(), "cpus": os.cpu_count()}
    try:
        import flash_attn  # the optional [gpu] extra: its absence is a finding, not an error

        env["flash_attn"] = flash_attn.__version__
    except ImportError as e:
        env["flash_attn"] = f"not installed ({e})"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpus=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    return env


STAGES = {"kernels": lambda d, q, w, t: kernels_stage(d, q), "verify": verify_stage, "baseline": baseline_stage,
          "bench": bench_stage}


def run(device: str, quick: bool, budget_s: float, json_path: Path | None = None,
        stages: tuple[str, ...] = tuple(STAGES)) -> dict:
    """``stages`` in turn within ``budget_s``; with ``json_path`` the report is written there
    after each stage, so a run stopped from outside keeps what it finished."""
    deadline = Deadline(budget_s)
    report: dict = {"device": device, "quick": quick, "budget_s": budget_s, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                    "environment": environment(device)}
    with tempfile.TemporaryDirectory(prefix="apb-gpu-check-") as tmp:
        for name, stage in STAGES.items():
            if name not in stages:
                continue
            t0 = time.perf_counter()
            try:
                report[name] = stage(device, quick, Path(tmp), deadline)
            except Exception as e:  # a failed stage is a finding; the others still run
                report[name] = {"error": f"{type(e).__name__}: {e}"}
            report[name]["stage_seconds"] = round(time.perf_counter() - t0, 1)
            if json_path is not None:
                json_path.write_text(json.dumps(report, indent=1))
    return report


def failed_stages(report: dict, stages: tuple[str, ...] = tuple(STAGES)) -> list[str]:
    return [k for k in stages if k not in report or "error" in report[k] or report[k].get("exit", 0) != 0
            or any(isinstance(v, dict) and v.get("exit", 0) != 0 for v in report[k].values())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m apb.tools.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--quick", action="store_true", help="small sizes (the CPU plumbing check)")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="the whole run's time budget in seconds (default 480: 8 minutes)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)} (default: all)")
    ap.add_argument("--json", required=True, help="write the whole report here")
    args = ap.parse_args(argv)
    stages = tuple(args.stages.split(","))
    if set(stages) - set(STAGES):
        ap.error(f"--stages: unknown {sorted(set(stages) - set(STAGES))}; valid: {', '.join(STAGES)}")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; use --device cpu --quick for the plumbing", file=sys.stderr)
        return 2
    report = run(device, args.quick, args.budget_s, Path(args.json), stages)
    failed = failed_stages(report, stages)
    print(f"gpu-check on {device}: " + ("all stages passed" if not failed else f"failed: {', '.join(failed)}")
          + f"; wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
