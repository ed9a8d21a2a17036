"""The Python batch API (local worker processes): records, errors, resume, worker death."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from apb.config import ConfigError
from apb.engine import RESULT_KEYS, Engine
from apb.runtime.decode import Sampling, decode_loop, token_lead

GOOD = [{"id": f"doc-{i}", "context": f"Document {i}. " + "The sky is blue and the grass is green. " * (20 + 15 * i),
         "question": f"What colour is item {i}?"} for i in range(4)]
BAD = [
    ({"id": "no-question", "context": "text"}, "missing field 'question'"),
    ({"id": "wrong-type", "context": 42, "question": "q"}, "field 'context' must be a string"),
    ({"id": "empty", "context": "   ", "question": "q"}, "field 'context' is empty"),
    ({"id": "too-long", "context": "x" * 9000, "question": "q"}, "exceeds the model's limit"),
    ({"id": "bad-max", "context": "abc", "question": "q", "max_new_tokens": 0}, "max_new_tokens"),
    ("not an object", "must be a JSON object"),
]


@pytest.fixture(scope="module")
def engine(repo):
    with Engine.from_config(repo / "configs/tiny-cpu.yaml", method="apb", max_new_tokens=4) as e:
        yield e


def test_results_in_order_with_error_records_for_bad_input(engine):
    docs = [GOOD[0], BAD[0][0], GOOD[1], BAD[1][0], BAD[2][0], BAD[3][0], BAD[4][0], BAD[5][0], GOOD[2]]
    out = list(engine.process(docs))
    assert len(out) == len(docs)
    for rec in out:
        assert tuple(rec) == RESULT_KEYS
    assert [r["id"] for r in out[:3]] == ["doc-0", "no-question", "doc-1"]
    assert out[-1]["id"] == "doc-2" and out[7]["id"] == "#7"
    for rec, (_, msg) in zip(out[1:2] + out[3:8], BAD):
        assert rec["answer"] is None and msg in rec["error"] and rec["error_kind"] == "final", rec
    for rec in (out[0], out[2], out[8]):
        assert rec["error"] is None and rec["error_kind"] is None and isinstance(rec["answer"], str)
        assert rec["method"] == "apb" and rec["world_size"] == 2 and rec["prompt_tokens"] > 100
        assert rec["prefill_s"] > 0 and rec["lead"] >= 0  # greedy: every token leads the runner-up
    assert all(rec["lead"] is None for rec in out[1:2] + out[3:8])


def test_token_lead_and_the_decode_loop_record_it():
    logits = torch.tensor([1.0, 3.0, 2.5, -1.0])
    logp = torch.log_softmax(logits, -1)
    assert token_lead(logits, 1) == pytest.approx(float(logp[1] - logp[2]))  # the gap to the runner-up
    assert token_lead(logits, 2) == pytest.approx(float(logp[2] - logp[1]))  # negative: not greedy's pick
    steps = [torch.tensor([0.0, 0.0, 5.0]), torch.tensor([2.0, 1.9, 0.0])]
    leads: list[float] = []
    tokens = decode_loop(lambda tok, pos: steps[pos - 10], torch.tensor([4.0, 0.0, 1.0]), 10,
                         Sampling(max_new_tokens=3), leads=leads)
    assert tokens == [0, 2, 0]
    assert leads == pytest.approx([3.0, 5.0, 0.1], abs=1e-5)  # log-softmax differences are logit differences


def test_same_answer_as_a_second_run(engine):
    a = list(engine.process(GOOD[:2]))
    b = list(engine.process(GOOD[:2]))
    assert [r["answer"] for r in a] == [r["answer"] for r in b]


def _write(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())


def test_process_file_resume_and_config_guard(engine, tmp_path, repo):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, [GOOD[0], BAD[0][0], b'{"id": "utf", "context": "\xff\xfe", "question": "q"}\n', b"{not json\n",
                 GOOD[1]])
    first = engine.process_file(src, dst, progress=False)
    recs = [json.loads(x) for x in dst.read_text().splitlines()]
    assert len(recs) == 5 and first.documents == 5 and first.errors == 3
    assert [r["error"] is None for r in recs] == [True, False, False, False, True]
    assert "not valid UTF-8" in recs[1]["error"] or "not valid UTF-8" in recs[2]["error"]
    assert any("not valid JSON" in (r["error"] or "") for r in recs)
    assert (tmp_path / "out.jsonl.config.yaml").is_file()
    answered = {r["id"]: r["answer"] for r in recs if r["error"] is None}

    again = engine.process_file(src, dst, progress=False)
    assert again.skipped == 5 and again.skipped_errors == 3 and again.documents == 0  # final errors are kept
    assert [json.loads(x) for x in dst.read_text().splitlines()] == recs

    retried = engine.process_file(src, dst, progress=False, retry_errors=True)
    recs2 = [json.loads(x) for x in dst.read_text().splitlines()]
    assert retried.skipped == 2 and retried.documents == 3  # only the failed ones are retried
    assert len(recs2) == 5 and len({r["id"] for r in recs2}) == 5  # nothing duplicated
    assert {r["id"]: r["answer"] for r in recs2 if r["error"] is None} == answered

    with Engine.from_config(repo / "configs/tiny-cpu.yaml", method="star", max_new_tokens=4) as other:
        with pytest.raises(ConfigError, match="different config"):
            other.process_file(src, dst, progress=False)


def test_killed_worker_fails_only_the_document_in_flight(repo):
    # no retry: the document in flight gets a transient error record, the next a fresh group
    with Engine.from_config(repo / "configs/tiny-cpu.yaml", method="ring", max_new_tokens=3,
                            overrides={"parallel.max_retries": 0}) as e:
        results = []
        for i, rec in enumerate(e.process(GOOD[:3])):
            results.append(rec)
            if i == 0:
                os.kill(e.group.pids()[1], signal.SIGKILL)
    assert results[0]["error"] is None
    assert results[1]["error"] is not None and "worker rank 1 died" in results[1]["error"]
    assert results[1]["error_kind"] == "transient"
    assert results[2]["error"] is None and isinstance(results[2]["answer"], str)


def test_killed_worker_is_retried_on_a_fresh_group(repo):
    with Engine.from_config(repo / "configs/tiny-cpu.yaml", method="ring", max_new_tokens=3) as e:
        first = e.process_one(GOOD[0])
        pids = e.group.pids()
        os.kill(pids[1], signal.SIGKILL)
        second = e.process_one(GOOD[1])  # fails on the dead group, then runs on a new one
        assert e.group.pids() != pids and not set(e.group.pids()) & set(pids)
    assert first["error"] is None and second["error"] is None and isinstance(second["answer"], str)


def test_from_config_rejects_unknown_shortcut(repo):
    with pytest.raises(ConfigError, match="shortcuts"):
        Engine.from_config(repo / "configs/tiny-cpu.yaml", wrld_size=2)


def test_method_that_cannot_run_the_model_fails_at_load(repo, tmp_path):
    # a bidirectional encoder is refused from its config, before any worker starts
    with pytest.raises(ConfigError, match="is_causal=False|bidirectional"):
        Engine.from_config(repo / "configs/tiny-cpu.yaml", model=str(_checkpoint(repo, tmp_path, "bert", is_decoder=False)),
                           world_size=2)


def _checkpoint(repo, where, model_type, **overrides):
    """A tiny random checkpoint of ``model_type`` with the byte tokenizer of the presets, saved
    under ``where`` (a test's tmp_path, so pytest cleans it up)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from apb.model.catalog import resolve_model

    path = Path(where) / model_type
    cfg = AutoConfig.for_model(model_type, vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2, **overrides)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(resolve_model("tiny-llama")) / name, path / name)
    return path


def test_a_model_the_workers_refuse_stops_the_run_before_any_document(repo, tmp_path):
    """Phi rotates only the first half of each head: apb's query cannot be moved to its true
    positions, which only the loaded model shows (its own rotation, on the workers). The engine
    asks the workers before the first document: one ConfigError with the reason and the fix, no
    document run and none failed with a traceback. With the query scored where its copy sits,
    the same model runs."""
    path = _checkpoint(repo, tmp_path, "phi", partial_rotary_factor=0.5)
    with Engine.from_config(repo / "configs/tiny-cpu.yaml", model=str(path), method="apb", world_size=2,
                            max_new_tokens=2) as e:
        with pytest.raises(ConfigError, match="refused by the workers before any document.*query_positions: anchor"):
            e.process_one(GOOD[0])
    with Engine.from_config(repo / "configs/tiny-cpu.yaml", {"method.query_positions": "anchor"}, model=str(path),
                            method="apb", world_size=2, max_new_tokens=2) as e:
        rec = e.process_one(GOOD[0])
        assert rec["error"] is None and isinstance(rec["answer"], str)


def test_local_workers_split_the_cores(monkeypatch):
    from apb import engine
    from apb.config import load_config

    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert [engine.local_threads(w) for w in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    seen = {}
    monkeypatch.setattr(engine.groups, "start_group", lambda launcher, world, kwargs, timeout, ray_config: seen.update(
        {launcher: (kwargs["threads"], kwargs["decode_threads"])}))
    engine.start_group(load_config(None, {"parallel.world_size": 4}))
    engine.start_group(load_config(None, {"parallel.world_size": 4, "parallel.launcher": "ray"}))
    engine.start_group(load_config(None, {"parallel.world_size": 4, "parallel.threads": 3}), launcher="local")
    assert seen == {"local": (3, None), "ray": (None, None)}  # a setting is kept, decoding included
    engine.start_group(load_config(None, {"parallel.world_size": 4}))
    # 8 cores over 4 local workers; the decode host takes all 8 while the others wait
    assert seen["local"] == (2, 8)


def test_the_decode_host_decodes_a_gathered_cache_on_its_decode_threads(monkeypatch, repo):
    """A worker with 1 thread and ``decode_threads=2`` prefills on 1 and decodes on 2, and is back
    on 1 afterwards; without ``decode_threads`` it decodes on its own 1."""
    from apb.model.catalog import resolve_model
    from apb.runtime import worker as worker_mod

    seen = []
    real = worker_mod.decode

    def decode(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(worker_mod, "decode", decode)
    before = torch.get_num_threads()
    try:
        for decode_threads in (2, None):
            w = worker_mod.Worker(None, 0, 1, device="cpu", threads=1, decode_threads=decode_threads)
            try:
                ids = torch.arange(3, 40)
                out = w.run_prompt(worker_mod.PromptRequest(str(resolve_model("tiny-llama")), ids, "full",
                                                            sampling=Sampling(max_new_tokens=2, stop_at_eos=False)))
                assert len(out.tokens) == 2 and torch.get_num_threads() == 1
            finally:
                w.close()
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 1]


def test_workers_are_told_whether_to_keep_freed_memory(monkeypatch):
    from apb import engine
    from apb.config import load_config

    seen = []
    monkeypatch.setattr(engine.groups, "start_group", lambda launcher, world, kwargs, timeout, ray_config: seen.append(
        kwargs["retain_freed_memory"]))
    engine.start_group(load_config(None, {}))
    engine.start_group(load_config(None, {"parallel.retain_freed_memory": True}))
    engine.start_group(load_config(None, {"parallel.launcher": "ray", "parallel.retain_freed_memory": True}))
    assert seen == [False, True, True]  # opt-in: it costs peak memory


def test_a_worker_refuses_to_keep_freed_memory_where_the_allocator_cannot(monkeypatch):
    from apb.runtime import allocator
    from apb.runtime.worker import Worker

    # a C library that is not glibc (or refuses mallopt): the setting cannot be honoured, so it is
    # refused before the worker joins any group, naming the field and the fix
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: False)
    with pytest.raises(ValueError, match="parallel.retain_freed_memory is set.*set parallel.retain_freed_memory: false"):
        Worker(None, 0, 1, device="cpu", retain_freed_memory=True)
