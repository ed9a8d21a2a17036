"""Where `full` at W=1 spends its time beside transformers' own sdpa forward, kernel by kernel.

    python docs/results/gpu/profile_full.py N [MODEL]   (run on the GPU by run-device.sh)

One in-process prefill of N random tokens each way (after a warm-up), under torch's profiler;
prints the wall times and each run's top kernels by device time.
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from apb.config import MethodConfig
from apb.methods import build_method
from apb.model.catalog import resolve_model
from apb.model.loading import load_model
from apb.parallel.comm import Comm
from apb.runtime import measure
from apb.runtime.prefill import prefill

n = int(sys.argv[1])
name = sys.argv[2] if len(sys.argv) > 2 else "bench-llama8b-2layer"
device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
dtype = "bfloat16" if device.type == "cuda" else "float32"
path = resolve_model(name, 0)
ours_model = load_model(path, dtype, device)
hf_model = load_model(path, dtype, device, attn_implementation="sdpa")
ids = torch.randint(0, ours_model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
method = build_method("full", MethodConfig(name="full"))
runs = {"apb full": lambda: prefill(ours_model, ids, method, Comm(None)),
        "hf sdpa": lambda: hf_model(ids.to(device)[None], use_cache=True, logits_to_keep=1)}
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
with torch.no_grad():
    for label, fn in runs.items():
        fn()
        measure.sync(device)
        t0 = time.perf_counter()
        fn()
        measure.sync(device)
        print(f"{label}: {time.perf_counter() - t0:.4f} s at n={n} ({name}, {dtype}, {device})")
    for label, fn in runs.items():
        with profile(activities=activities) as prof:
            fn()
            measure.sync(device)
        print(f"\n== {label}")
        print(prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=70))
