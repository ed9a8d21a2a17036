"""The per-host memory estimate: its weights and KV figures against what a real prefill holds, and
documents refused for memory before any worker starts (Engine and `apb run --dry-run`)."""

import json
import subprocess

import pytest
import torch

from apb.config import MethodConfig
from apb.engine import Engine
from apb.methods import build_method
from apb.model.catalog import resolve_model
from apb.model.loading import load_model
from apb.parallel.groups.local import LocalWorkerGroup
from apb.runtime import memory
from apb.runtime.decode import Sampling
from apb.runtime.worker import PromptRequest
from apb.tools.verify import random_prompt

WORLD = 3


def test_weights_are_the_loaded_models_bytes():
    path = resolve_model("tiny-llama")
    model = load_model(path)
    assert memory.parameter_count(path) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-deepseek-v3"])  # GQA; MLA's latent pair
def test_kv_figure_is_the_cache_each_host_holds(preset):
    """full, ring, apb and spava at W=3: a host's estimated KV bytes equal the part it sends to the decode host
    in the gather (counted on the wire: its K/V plus 8 bytes of position per token), and the
    decode host's gathered cache is the whole prompt's."""
    path = resolve_model(preset)
    cfg = load_model(path).config
    n, n_query = 301, 17
    per_token = cfg.num_hidden_layers * memory.kv_bytes_per_token(cfg, 4)
    ids = random_prompt(n, cfg.vocab_size, 0)
    with LocalWorkerGroup(WORLD, worker_kwargs={"device": "cpu", "timeout_s": 120}, timeout_s=300) as group:
        for name in ["full", "ring", "apb", "spava"]:
            hosts = memory.estimate(build_method(name, MethodConfig()), cfg, 0, n, n_query, WORLD, "float32",
                                    "gather", 1)
            assert sum(h.kv for h in hosts) == n * per_token, name
            req = PromptRequest(str(path), ids, name, n_query=n_query, return_cache=True,
                                sampling=Sampling(max_new_tokens=1))
            for res in group.call("run_prompt", req):
                if res.rank == 0:
                    held = (res.cache.keys.numel() + res.cache.values.numel()) * 4
                    assert held == n * per_token, (preset, name, held)
                    continue
                sent = sum(o["bytes"] for o in res.stats["ops"] if o["op"] == "gather")
                tokens, rest = divmod(sent, per_token + 8)
                assert rest == 0 and hosts[res.rank].kv == tokens * per_token, (preset, name, res.rank, sent)


def test_gather_mode_counts_the_whole_cache_once_and_a_staging_share_on_the_decode_host():
    cfg = load_model(resolve_model("tiny-llama")).config
    method = build_method("ring", MethodConfig())
    per = memory.kv_bytes_per_token(cfg, 2) * cfg.num_hidden_layers
    gather = memory.estimate(method, cfg, 10, 1000, 0, 4, "bfloat16", "gather", 8)
    dist = memory.estimate(method, cfg, 10, 1000, 0, 4, "bfloat16", "distributed", 8)
    # gather: the whole cache received into buffers with room for the 8 new tokens, through a staging
    # buffer of one sending host's share (250 of 1000 tokens under ring's zigzag at W=4);
    # distributed: the decode host's own share copied once into a buffer with room for them
    assert gather[0].decode == 1000 * per + 8 * per + 250 * per and dist[0].decode == 250 * per + 8 * per
    assert all(h.decode == 0 for h in gather[1:]) and gather[0].weights == 20


def test_a_document_too_large_is_refused_before_any_worker_starts(repo):
    engine = Engine.from_config(repo / "configs/tiny-cpu.yaml", overrides={"parallel.memory_gb": 0.005},
                                method="spava")
    small = engine.process_one({"id": "s", "context": "Alpha beta. " * 3, "question": "Which?",
                                "max_new_tokens": 2}, 0)
    assert small["error"] is None or "memory" not in small["error"]
    engine.close()
    engine = Engine.from_config(repo / "configs/tiny-cpu.yaml", overrides={"parallel.memory_gb": 0.005},
                                method="spava")
    rec = engine.process_one({"id": "big", "context": "Alpha beta gamma delta. " * 300, "question": "Which?"}, 0)
    assert rec["error_kind"] == "final" and "estimated memory too large: a prompt of" in rec["error"]
    assert "GiB a host may use (parallel.memory_gb)" in rec["error"] and "decode.mode: distributed" in rec["error"]
    assert engine._group is None  # refused on the driver: no worker was started for it


def test_dry_run_prints_every_document_and_runs_none(apb_bin, repo, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join([json.dumps({"id": "ok", "context": "Alpha beta. " * 40, "question": "Which?"}),
                              "not json",
                              json.dumps({"id": "big", "context": "Alpha beta gamma delta. " * 250,
                                          "question": "Which?"})]) + "\n")
    proc = subprocess.run([apb_bin, "run", "--config", str(repo / "configs/tiny-cpu.yaml"), "--input", str(src),
                           "--output", str(dst), "--method", "apb", "--dry-run", "--set", "parallel.memory_gb=0.02"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "budget per host: 0.02 GiB" in lines[0]
    ok = next(x for x in lines if x.startswith("ok "))
    assert ok.rstrip().endswith("ok")
    assert any(x.startswith("line-2") and "not valid JSON" in x for x in lines)
    big = next(x for x in lines if x.startswith("big "))
    assert "refused: estimated memory too large" in big
    assert "2 document(s) would be refused" in lines[-1] and not dst.exists()


def test_peak_memory_follows_what_was_allocated_and_resets():
    """The bench's per-host peak: 256 MiB touched after a reset shows in the peak; the next reset
    forgets it."""
    from apb.runtime import measure

    cpu = torch.device("cpu")
    assert measure.reset_peak(cpu)  # Linux: /proc/self/clear_refs
    base = measure.peak_bytes(cpu)
    big = torch.ones(64 << 20)  # 256 MiB, written, so resident
    high = measure.peak_bytes(cpu)
    assert high - base >= 250 << 20
    del big
    measure.reset_peak(cpu)
    assert measure.peak_bytes(cpu) < high - (200 << 20)


def test_exact_layers_count_their_head_sharded_buffers():
    """apb with an exact layer at W=3 on tiny-llama (12 query / 4 KV heads of 16, float32): a host
    holds every host's rows of its 4 query heads and 2 KV heads, their output, and its own rows'
    output for all 12 heads coming back; the estimate covers that, and without exact layers it is
    the passing buffers alone."""
    cfg = load_model(resolve_model("tiny-llama")).config
    n, n_query = 3000, 20
    for name in ("apb", "spava"):
        plain = memory.estimate(build_method(name, MethodConfig()), cfg, 0, n, n_query, WORLD, "float32", "gather", 1)
        exact = memory.estimate(build_method(name, MethodConfig(exact_layers=1)), cfg, 0, n, n_query, WORLD,
                                "float32", "gather", 1)
        for p, e in zip(plain, exact):
            local = (n - n_query) // WORLD + 1
            held = ((n - n_query) * (4 + 2 + 2) * 16 + (n - n_query) * 4 * 16 + local * 12 * 16) * 4
            assert e.transfer >= held > p.transfer, (name, p.transfer, e.transfer, held)


def test_a_shared_anchor_is_counted_where_it_is_held():
    """apb and star at W=4 on tiny-llama: with share_anchor the hosts that receive the anchor run
    (so hold activations for) their block alone, the source as before, and every host counts the
    anchor's K/V arriving in one layer's buffer."""
    cfg = load_model(resolve_model("tiny-llama")).config
    n, n_query, world = 2000, 20, 4
    per_tok = memory.kv_bytes_per_token(cfg, 4)
    for name, receivers in (("apb", (2, 3)), ("star", (1, 2, 3))):
        plain = build_method(name, MethodConfig(share_anchor=False))
        own = memory.estimate(plain, cfg, 0, n, n_query, world, "float32", "gather", 1)
        method = build_method(name, MethodConfig(share_anchor=True))
        shared = memory.estimate(method, cfg, 0, n, n_query, world, "float32", "gather", 1)
        before, after = plain.layout(n, world, n_query), method.layout(n, world, n_query)
        for r, (o, s) in enumerate(zip(own, shared)):
            assert s.kv == o.kv, (name, r)
            # activations follow the rows a host runs: the receivers lose the anchor's
            assert s.activations * before[r].size == o.activations * after[r].size, (name, r)
            assert (after[r].size < before[r].size) == (r in receivers), (name, r)
            assert s.transfer == o.transfer + 2 * method.anchor_len(n, world) * per_tok, (name, r)


@pytest.mark.parametrize("name", ["spava", "apb"])
def test_a_split_anchor_is_counted_where_it_is_held(name):
    """W=4 on tiny-llama, against every host's own anchor: split, a host runs (so holds
    activations for) only its share of the anchor, caches what it cached before, and counts
    every host's share arriving (padded to the largest). spava: a share on every host, the one it
    caches; apb: shares of the anchor with the query embedded on hosts 0..2, none on host 3
    (which attends the most passing), host 0 keeping its scoring tail, the others dropping the
    whole anchor they held."""
    cfg = load_model(resolve_model("tiny-llama")).config
    n, n_query, world = 2000, 20, 4
    per_tok = memory.kv_bytes_per_token(cfg, 4)
    plain, method = build_method(name, MethodConfig(share_anchor=False)), build_method(name, MethodConfig())
    assert method.config.share_anchor in (True, "split")  # the default
    own = memory.estimate(plain, cfg, 0, n, n_query, world, "float32", "gather", 1)
    split = memory.estimate(method, cfg, 0, n, n_query, world, "float32", "gather", 1)
    before, after = plain.layout(n, world, n_query), method.layout(n, world, n_query)
    anchor = method.anchor_len(n - n_query, world)
    shares = [sum(c.size for c in s.chunks if c.kind == "anchor") for s in after]
    holders = world if name == "spava" else world - 1
    assert sum(shares) == anchor + (n_query if name == "apb" else 0) and not any(shares[holders:]), shares
    assert max(shares) - min(shares[:holders]) <= 1, shares
    for r, (o, s) in enumerate(zip(own, split)):
        assert s.kv == o.kv, r
        dropped = anchor if name == "spava" else (0 if r == 0 else anchor + n_query)
        assert after[r].size == before[r].size - dropped + shares[r], r
        assert s.activations * before[r].size == o.activations * after[r].size, r
        assert s.transfer == o.transfer + 2 * world * -(-method.anchor_len(n, world) // holders) * per_tok, r
