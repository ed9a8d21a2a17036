"""``make gpu-check``: one run that says whether the GPU hot path works here, and how fast.

Stages, each recorded in one JSON file (a failing stage is recorded with its error and the
others still run):

1. ``kernels``: every attention backend available on the device (flash-attn, torch's, the naive
   reference) on the same bfloat16 inputs (GQA, causal, a windowed call), against ``naive`` in
   float32: largest output and LSE differences;
2. ``verify``: ``apb verify`` for every method at W=1, and at W=2; on a machine with one GPU the
   two ranks share it (``parallel.share_gpus``: NCCL refuses two ranks on one device, so they talk
   over gloo through host copies, and ulysses, whose all-to-all needs NCCL, is left out);
3. ``bench``: ``apb bench`` (its default model, ``bench-attn``) for full, ring, apb and spava in
   bfloat16 at 32K-128K tokens at W=2
   (on one GPU, shared as above: the code runs on CUDA, but the two ranks' kernels take turns on
   one device, so the times are not those of two GPUs; ``shared_gpu`` says which it was).

``--device cpu --quick`` runs the same plumbing with small sizes on CPU (tests do).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from apb.kernels import attention, available_backends

#: star:shared at W = 2 sends host 0's anchor to host 1 each layer: the broadcast on the device;
#: spava (its anchor split by default) gathers the anchor's shares with its passing blocks in one
#: flat buffer, spava:unshared does not
METHODS = "full,ring,ulysses,star,star:shared,apb,spava,spava:unshared"
BENCH_METHODS = "full,ring,apb,spava"
#: with --quick (the CPU plumbing check): fewer methods, one short length
QUICK_METHODS, QUICK_BENCH_METHODS, QUICK_LENGTHS = "full,ring,apb", "full,apb", "512"


def kernels_stage(device: str, quick: bool) -> dict:
    """Each backend against naive float32, on bfloat16 inputs (float32 on CPU, where the fused
    kernels take what the model runs in)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = 256 if quick else 4096
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, 8, n, 128, generator=g).to(device, dtype)
    k = torch.randn(1, 2, n, 128, generator=g).to(device, dtype)
    v = torch.randn(1, 2, n, 128, generator=g).to(device, dtype)
    ref_out, ref_lse = attention(q.float(), k.float(), v.float(), causal=True, backend="naive")
    rows = []
    for name in available_backends():
        if name == "flash_attn" and device != "cuda":
            continue
        t0 = time.perf_counter()
        out, lse = attention(q, k, v, causal=True, backend=name)
        if device == "cuda":
            torch.cuda.synchronize()
        rows.append({"backend": name, "dtype": str(dtype).removeprefix("torch."), "n": n,
                     "max_abs_out_diff": float((out.float() - ref_out).abs().max()),
                     "max_abs_lse_diff": float((lse - ref_lse).abs().max()), "seconds": time.perf_counter() - t0})
    win_out, _ = attention(q, k, v, causal=True, window=128)
    win_ref, _ = attention(q.float(), k.float(), v.float(), causal=True, window=128, backend="naive")
    return {"rows": rows, "window_128_max_abs_out_diff": float((win_out.float() - win_ref).abs().max())}


def _apb(args: list[str], timeout_s: float) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "apb", *args], capture_output=True, text=True, timeout=timeout_s)
    return proc.returncode, (proc.stdout + proc.stderr)[-4000:]


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


def verify_stage(device: str, quick: bool, work: Path) -> dict:
    out = {}
    n = 301 if quick else 4097
    for world in (1, 2):
        sets, methods = _placement(device, world, QUICK_METHODS if quick else METHODS)
        path = work / f"verify-w{world}.json"
        rc, tail = _apb(["verify", "--methods", methods, "--world-size", str(world), "--prompt-len", str(n),
                         "--tokens", "4", "--dtype", "bfloat16" if device == "cuda" else "float32", *sets,
                         "--json", str(path)], 1200)
        out[f"W{world}"] = {"exit": rc, "shared_gpu": shares_gpu(device, world), "methods": methods,
                            "rows": json.loads(path.read_text())["results"] if path.exists() else None,
                            "output_tail": tail}
    return out


def bench_stage(device: str, quick: bool, work: Path) -> dict:
    world = 2
    sets, methods = _placement(device, world, QUICK_BENCH_METHODS if quick else BENCH_METHODS)
    lengths = QUICK_LENGTHS if quick else "32768,65536,131072"
    path = work / "bench.json"
    rc, tail = _apb(["bench", "--methods", methods, "--lengths", lengths, "--world-size", str(world), "--repeats",
                     "1" if quick else "3", *sets, "--set",
                     f"model.dtype={'bfloat16' if device == 'cuda' else 'float32'}", "--json", str(path)], 3600)
    return {"exit": rc, "world_size": world, "shared_gpu": shares_gpu(device, world),
            "report": json.loads(path.read_text()) if path.exists() else None, "output_tail": tail}


STAGES = {"kernels": lambda d, q, w: kernels_stage(d, q), "verify": verify_stage, "bench": bench_stage}


def run(device: str, quick: bool) -> dict:
    report: dict = {"device": device, "quick": quick, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}
    with tempfile.TemporaryDirectory(prefix="apb-gpu-check-") as tmp:
        for name, stage in STAGES.items():
            t0 = time.perf_counter()
            try:
                report[name] = stage(device, quick, Path(tmp))
            except Exception as e:  # a failed stage is a finding; the others still run
                report[name] = {"error": f"{type(e).__name__}: {e}"}
            report[name]["stage_seconds"] = round(time.perf_counter() - t0, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m apb.tools.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--quick", action="store_true", help="small sizes (the CPU plumbing check)")
    ap.add_argument("--json", required=True, help="write the whole report here")
    args = ap.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; use --device cpu --quick for the plumbing", file=sys.stderr)
        return 2
    report = run(device, args.quick)
    Path(args.json).write_text(json.dumps(report, indent=1))
    failed = [k for k in STAGES if "error" in report[k] or report[k].get("exit", 0) != 0
              or any(isinstance(v, dict) and v.get("exit", 0) != 0 for v in report[k].values())]
    print(f"gpu-check on {device}: " + ("all stages passed" if not failed else f"failed: {', '.join(failed)}")
          + f"; wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
