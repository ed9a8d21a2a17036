"""One host of the sequence-parallel group. The same class serves every launcher.

A launcher (local processes, Ray actors, torchrun) constructs one :class:`Worker` per host with
a rendezvous address; the worker joins the process group, loads models on demand (cached by
path and dtype), and runs whole prompts: prefill with a method, then decoding, either after a
gather of the KV cache to the decode host (sequence-parallel rank 0) or with the cache left in
place (``decode_mode="distributed"``).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers.utils import logging as hf_logging

from apb.config import MethodConfig
from apb.methods import build_method
from apb.model.loading import load_model
from apb.parallel.comm import CommStats, Phase
from apb.parallel.rendezvous import init_distributed, shutdown
from apb.parallel.state import build_parallel_state
from apb.runtime import allocator, measure
from apb.runtime.cache import KVCache, decode_keeps, gather_cache, to_hf_cache
from apb.runtime.decode import Sampling, decode, decode_distributed
from apb.runtime.prefill import check_model, prefill


@dataclass
class PromptRequest:
    model_path: str
    input_ids: torch.Tensor  # 1-D
    method: str = "ring"
    method_options: dict = field(default_factory=dict)
    n_query: int = 0  # the last n_query prompt tokens are the query
    decode_mode: str = "gather"
    dtype: str = "float32"
    sampling: Sampling = Sampling()
    eos_ids: tuple[int, ...] = ()
    return_cache: bool = False  # ship the gathered cache back (verification)
    diagnostics: bool = False  # also return what the method chose on each host (apb diagnose)
    #: benchmarks: synchronize the device before every clock read (see CommStats.sync) and measure
    #: the prefill's peak memory
    timed: bool = False
    #: benchmarks: record a timeline of every layer and communication call (CommStats.trace)
    trace: bool = False
    #: verification: return the experts each host's forwards chose (PrefillResult.routing)
    routing: bool = False


@dataclass
class PromptResult:
    rank: int
    stats: dict
    prefill_s: float
    last_logits: torch.Tensor | None = None  # decode host only
    tokens: list[int] | None = None
    #: each token's lead over the most likely other token (``decode.token_lead``), decode host only
    leads: list[float] | None = None
    decode_s: float = 0.0  # gather mode: includes moving the cache to the decode host
    cache: KVCache | None = None
    #: with ``diagnostics``: {"passing": {layer: global prompt indices this host passed, (kv_heads, p)}}
    diagnostics: dict | None = None
    #: with ``routing``: this host's expert choices, ``{layer: (positions, chosen)}``
    routing: dict | None = None
    #: this host's peak memory through a timed prefill (max allocated on CUDA, peak RSS on a CPU
    #: host; None for an untimed one, or where the peak cannot be reset per prompt)
    peak_prefill_bytes: int | None = None
    #: this host's peak memory from the end of a timed prefill through the gather and the decoding
    #: (as ``peak_prefill_bytes``; on the decode host it covers the gathered cache and the answer)
    peak_decode_bytes: int | None = None
    #: minor page faults this host's process took through a timed prefill (pages the system had
    #: to hand it and zero: see apb.runtime.allocator); None for an untimed one
    prefill_faults: int | None = None
    #: bytes of the K/V this host kept from its prefill (its part of the cache, before any gather)
    cache_bytes: int | None = None


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``n`` inside the block (unchanged for None)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Worker:
    def __init__(self, init_method: str | None, rank: int, world_size: int, local_rank: int | None = None,
                 device: str = "auto", timeout_s: float = 300.0, device_index: int | None = None,
                 threads: int | None = None, share_gpus: bool = False, retain_freed_memory: bool = False,
                 decode_threads: int | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        hf_logging.disable_progress_bar()
        if threads:  # benchmarks pin each host to its share of the cores
            torch.set_num_threads(threads)
        #: CPU threads while this host decodes a gathered cache alone (the other local workers wait
        #: idle then, so their cores are free); None: its own share
        self.decode_threads = decode_threads
        if retain_freed_memory and not allocator.retain_freed_memory():
            raise ValueError("parallel.retain_freed_memory is set, but this host's C library is not glibc or refused "
                             "the setting (apb.runtime.allocator): set parallel.retain_freed_memory: false")
        self.env = init_distributed(init_method, rank, world_size, local_rank, timeout_s, device, device_index,
                                    share_gpus)
        if self.env.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise probes and warns
        self.state = build_parallel_state(self.env)
        self._models: dict[tuple[str, str], torch.nn.Module] = {}

    def info(self) -> dict:
        return {"rank": self.env.rank, "world_size": self.env.world_size, "local_rank": self.env.local_rank,
                "device": str(self.env.device), "backend": self.env.backend, "pid": os.getpid()}

    def model(self, path: str, dtype: str) -> torch.nn.Module:
        key = (str(path), dtype)
        if key not in self._models:
            self._models[key] = load_model(path, dtype, self.env.device)
        return self._models[key]

    def check_model(self, model_path: str, dtype: str, method: str, method_options: dict) -> None:
        """Load the model and refuse it (``ValueError``) where no prompt could run it with ``method``:
        the driver asks before its first document, so that such a model stops the run with one
        reason instead of failing every document."""
        check_model(self.model(model_path, dtype), build_method(method, MethodConfig(**method_options)),
                    self.env.world_size)

    def run_prompt(self, req: PromptRequest) -> PromptResult:
        if req.decode_mode not in ("gather", "distributed"):
            raise ValueError(f"decode mode {req.decode_mode!r}: valid modes are gather, distributed")
        model = self.model(req.model_path, req.dtype)
        method = build_method(req.method, MethodConfig(**req.method_options))
        device = self.env.device
        comm = self.state.comm(CommStats(sync=measure.syncer(device) if req.timed else None,
                                         trace=[] if req.trace else None))
        peak_known = req.timed and measure.reset_peak(device)  # measured runs only: it touches process state
        comm.barrier()  # start the clock together
        faults = measure.minor_faults()
        res = prefill(model, req.input_ids.to(device), method, comm, n_query=req.n_query,
                      diagnostics=req.diagnostics, routing=req.routing,
                      whole_cache=req.return_cache or req.diagnostics)
        out = PromptResult(rank=self.env.rank, stats={}, prefill_s=res.seconds,
                           diagnostics={"passing": res.passing} if req.diagnostics else None, routing=res.routing,
                           peak_prefill_bytes=measure.peak_bytes(device) if peak_known else None,
                           prefill_faults=measure.minor_faults() - faults if req.timed else None,
                           cache_bytes=res.cache.nbytes)
        n = int(req.input_ids.numel())
        whole = None
        peak_known = req.timed and measure.reset_peak(device)
        t0 = time.perf_counter()
        if req.decode_mode == "gather":
            comm.stats.phase = Phase.GATHER
            # each layer sends only what transformers' cache keeps of it (a sliding layer's
            # window), except a cache returned for verification: every layer whole, decoded from
            # the same tails (views) as an unverified run
            keep = decode_keeps(model.config, n)
            # (for decoding alone, received straight into transformers' layout with room for the answer)
            whole = gather_cache(res.cache, comm, dst=0, keep=None if req.return_cache else keep,
                                 room=None if req.return_cache else req.sampling.max_new_tokens)
            res.cache = None  # gathered (on the decode host, copied into ``whole``)
            if whole is not None:
                out.leads = []
                hf_cache = to_hf_cache(whole.tails(keep), model.config, room=req.sampling.max_new_tokens)
                if not req.return_cache:  # transformers' cache is the one copy kept while decoding
                    whole = None
                with _threads(self.decode_threads):
                    out.tokens = decode(model, hf_cache, res.last_logits, n, req.sampling, req.eos_ids,
                                        leads=out.leads)
                del hf_cache
        else:
            leads = [] if self.state.sp_rank == 0 else None  # only the decode host's are returned
            tokens = decode_distributed(model, res, comm, n, req.sampling, req.eos_ids, leads=leads)
            if self.state.sp_rank == 0:
                out.tokens, out.leads = tokens, leads
            if req.return_cache:  # verification only: the cache is gathered after decoding
                comm.stats.phase = Phase.GATHER
                whole = gather_cache(res.cache, comm, dst=0)
        if peak_known:
            out.peak_decode_bytes = measure.peak_bytes(device)
        if out.tokens is not None:
            out.decode_s = time.perf_counter() - t0
            out.last_logits = res.last_logits.cpu()
        if req.return_cache and whole is not None:
            out.cache = whole.to("cpu")
        out.stats = comm.stats.to_dict()
        return out

    def close(self) -> None:
        shutdown()
