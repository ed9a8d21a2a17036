"""No document stops a batch, no failure is retried forever, no wrong result passes verify (issue 12).

Size checks on the driver (from each method's own layout), final vs transient error records,
retries on a fresh group, extra fields passed through, resume's rules, and how verify judges a
row. Most tests drive a real :class:`Engine` (tiny-llama tokenizer and config) with a fake worker
group that records its calls, so they need no worker processes; one runs the mixed batch on real
local workers. The command-level verify test is in ``test_cli.py``.
"""

import json
from dataclasses import dataclass

import pytest
import torch

from apb import engine as engine_module
from apb.batch import FINAL, TRANSIENT
from apb.config import ConfigError, MethodConfig, dump_config, load_config
from apb.engine import RESULT_KEYS, Engine
from apb.methods import build_method, method_names
from apb.parallel.groups import WorkerError
from apb.tools.verify import Gates, Reference, judge

GOOD = {"id": "good", "context": "The sky is blue and the grass is green. " * 12, "question": "What colour is the sky?"}
SHORT = {"id": "short", "context": "A", "question": "q?"}  # 2 context tokens: spava needs 2W


@dataclass
class FakeResult:
    tokens: list | None
    prefill_s: float = 0.25
    decode_s: float = 0.125
    leads: list | None = None


class FakeGroup:
    """A worker group with no processes: records every call; the first ``fail`` calls raise
    WorkerError (and close the group, as a real one does)."""

    def __init__(self, world_size: int = 2, fail: int = 0):
        self.world_size, self.fail, self.closed, self.calls, self.checks = world_size, fail, False, [], 0

    def call(self, fn, *args, **kwargs):
        if self.closed:
            raise WorkerError("this worker group is closed")
        if fn == "check_model":  # the engine's check before a group's first document: passes
            self.checks += 1
            return [None] * self.world_size
        self.calls.append((fn, args))
        if self.fail:
            self.fail -= 1
            self.closed = True
            raise WorkerError("worker rank 1 died (exit code -9) during 'run_prompt'", rank=1)
        return [FakeResult([40, 41, 42])] + [FakeResult(None)] * (self.world_size - 1)

    def pids(self):
        return [1001 + r for r in range(self.world_size)]

    def close(self, force=False):
        self.closed = True


def _cfg(repo, **overrides):
    return load_config(repo / "configs/tiny-cpu.yaml", {"method.name": "spava", "decode.max_new_tokens": 3} | overrides)


def _groups(monkeypatch, *groups):
    """Make the engine start ``groups`` in turn; returns the list of those started so far."""
    started, queue = [], list(groups)

    def start(cfg):
        started.append(queue.pop(0))
        return started[-1]

    monkeypatch.setattr(engine_module, "start_group", start)
    return started


# -- sizes: each method's minimum, from its own layout --------------------------------------------

@pytest.mark.parametrize("name", method_names(with_variants=True))
def test_min_context_is_where_the_layout_starts_to_fit(name):
    expected = {"star": lambda w: w, "apb": lambda w: w, "spava": lambda w: 2 * w}
    for options in ({}, {"anchor_len": 0.5}, {"anchor_len": 10_000}):
        method = build_method(name, MethodConfig(**options))
        for world in (1, 2, 3, 5):
            for n_query in (0, 7):
                need = method.min_context(world, n_query)
                assert need == expected.get(name.partition(":")[0], lambda w: 1)(world), (name, options, world)
                for n_ctx in range(1, 3 * world + 3):
                    try:
                        method.layout(n_ctx + n_query, world, n_query)
                        fits = True
                    except ValueError:
                        fits = False
                    assert fits == (n_ctx >= need), (name, options, world, n_query, n_ctx)


def test_check_sizes_names_length_minimum_and_world_size():
    spava = build_method("spava", MethodConfig())
    spava.check_sizes(4 + 9, 9, 2)  # exactly the minimum
    with pytest.raises(ValueError) as e:
        spava.check_sizes(3 + 9, 9, 2)
    msg = str(e.value)
    assert "the context is 3 tokens" in msg and "needs at least 4" in msg and "W=2" in msg
    assert "longer context" in msg and "parallel.world_size" in msg


def test_too_short_document_never_reaches_a_worker(repo):
    group = FakeGroup()
    pids = group.pids()
    with Engine(_cfg(repo), group=group) as engine:
        short = engine.process_one(SHORT)
        assert group.calls == []  # refused on the driver
        good = engine.process_one(GOOD)
    assert short["error_kind"] == FINAL and short["answer"] is None and tuple(short) == RESULT_KEYS
    assert "the context is 2 tokens" in short["error"] and "needs at least 4" in short["error"]
    assert "W=2" in short["error"]
    assert good["error"] is None and good["error_kind"] is None and len(group.calls) == 1
    assert group.pids() == pids and not group.closed


# -- final vs transient, retries on a fresh group --------------------------------------------------

def test_transient_failure_is_retried_on_a_fresh_group(repo, monkeypatch):
    started = _groups(monkeypatch, FakeGroup(fail=1), FakeGroup())
    with Engine(_cfg(repo)) as engine:  # parallel.max_retries defaults to 1
        rec = engine.process_one(GOOD)
    assert rec["error"] is None and isinstance(rec["answer"], str)
    assert len(started) == 2 and started[0].closed and len(started[1].calls) == 1


def test_transient_failure_is_recorded_after_max_retries(repo, monkeypatch):
    started = _groups(monkeypatch, FakeGroup(fail=1), FakeGroup(fail=1), FakeGroup(fail=1), FakeGroup())
    with Engine(_cfg(repo, **{"parallel.max_retries": 2})) as engine:
        failed = engine.process_one(GOOD)
        after = engine.process_one(dict(GOOD, id="next"))
    assert failed["error_kind"] == TRANSIENT and failed["answer"] is None
    assert "tried 3 times" in failed["error"] and "worker rank 1 died" in failed["error"]
    assert failed["prompt_tokens"] > 0
    assert after["error"] is None and len(started) == 4  # the next document got a fresh group


def test_no_retry_with_max_retries_zero(repo, monkeypatch):
    started = _groups(monkeypatch, FakeGroup(fail=1), FakeGroup())
    with Engine(_cfg(repo, **{"parallel.max_retries": 0})) as engine:
        rec = engine.process_one(GOOD)
    assert rec["error_kind"] == TRANSIENT and "tried once" in rec["error"] and len(started) == 1


def test_a_group_passed_in_is_not_rebuilt(repo):
    with Engine(_cfg(repo), group=FakeGroup(fail=1)) as engine:
        with pytest.raises(WorkerError, match="rank 1 died"):
            engine.process_one(GOOD)


def test_max_retries_is_validated():
    assert load_config(None).parallel.max_retries == 1
    with pytest.raises(ConfigError, match="max_retries"):
        load_config(None, {"parallel.max_retries": -1})


# -- extra fields ----------------------------------------------------------------------------------

def test_extra_fields_pass_through_and_cannot_overwrite_a_result_key(repo):
    group = FakeGroup()
    with Engine(_cfg(repo), group=group) as engine:
        meta = engine.process_one(dict(GOOD, source="wiki", depth=0.25, tags=["a"], answer="blue"))
        short = engine.process_one(dict(SHORT, source="wiki"))
        clash = engine.process_one(dict(GOOD, id="clash", prefill_s=3))
        method = engine.process_one(dict(GOOD, id="clash2", method="mine", error_kind="x"))
    assert meta["error"] is None and list(meta) == [*RESULT_KEYS, "source", "depth", "tags"]
    assert (meta["source"], meta["depth"], meta["tags"]) == ("wiki", 0.25, ["a"])
    assert meta["answer"] != "blue"  # a reference answer in the input is ignored, not copied
    assert short["error_kind"] == FINAL and short["source"] == "wiki"
    assert clash["error_kind"] == FINAL and "['prefill_s']" in clash["error"] and tuple(clash) == RESULT_KEYS
    assert clash["prefill_s"] == 0.0
    assert "'method'" in method["error"] and "'error_kind'" in method["error"] and method["method"] == "spava"
    assert len(group.calls) == 1  # only the good document reached the workers


# -- resume ----------------------------------------------------------------------------------------

def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path, items):
    path.write_text("".join((it if isinstance(it, str) else json.dumps(it)) + "\n" for it in items))


def test_resume_keeps_final_errors_and_retries_transient_ones(repo, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    docs = [dict(GOOD, id=k) for k in "abcde"]
    _write(src, [*docs, SHORT, "{not json"])
    cfg = _cfg(repo)
    old = {"answer": None, "method": "spava", "world_size": 2, "prompt_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0}
    _write(dst, [old | {"id": "a", "answer": "x", "error": None, "error_kind": None},
                 old | {"id": "b", "error": "bad once", "error_kind": FINAL},
                 old | {"id": "c", "error": "worker failure: died", "error_kind": TRANSIENT},
                 old | {"id": "d", "error": "an error from before error_kind"},
                 '{"id": "e", "answ'])  # cut short by a crash
    dump_config(cfg, f"{dst}.config.yaml")
    group = FakeGroup()
    with Engine(cfg, group=group) as engine:
        first = engine.process_file(src, dst, progress=False)
        assert len(group.calls) == 3  # c (transient), d (no error_kind), e (cut short)
        recs = _read(dst)
        assert sorted(r["id"] for r in recs) == ["a", "b", "c", "d", "e", "line-7", "short"]
        assert first.documents == 5 and first.skipped == 2 and first.skipped_errors == 1
        by_id = {r["id"]: r for r in recs}
        assert by_id["b"]["error"] == "bad once"  # final: kept, not retried
        assert by_id["short"]["error_kind"] == by_id["line-7"]["error_kind"] == FINAL

        second = engine.process_file(src, dst, progress=False)  # nothing left to do
        assert second.documents == 0 and second.skipped == 7 and len(group.calls) == 3
        assert _read(dst) == recs

        third = engine.process_file(src, dst, progress=False, retry_errors=True)
        assert third.documents == 3 and len(group.calls) == 4  # b, short (refused again), line-7
    recs = _read(dst)
    assert len(recs) == 7 and len({r["id"] for r in recs}) == 7
    assert {r["id"] for r in recs if r["error"]} == {"short", "line-7"}


def test_resume_refuses_records_without_their_config(repo, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, [GOOD])
    _write(dst, [{"id": "good", "answer": "x", "error": None}])
    with Engine(_cfg(repo), group=FakeGroup()) as engine:
        with pytest.raises(ConfigError) as e:
            engine.process_file(src, dst, progress=False)
        assert str(dst) in str(e.value) and "out.jsonl.config.yaml" in str(e.value)
        assert "new output path" in str(e.value) and "delete" in str(e.value)
        assert _read(dst) == [{"id": "good", "answer": "x", "error": None}]  # untouched
        dst.write_text("\n")  # an empty output has nothing to mix
        assert engine.process_file(src, dst, progress=False).documents == 1


# -- the mixed batch on real workers ---------------------------------------------------------------

def test_mixed_batch_on_real_workers_no_restart_one_record_each(repo, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps(GOOD).encode(), json.dumps(SHORT).encode(),
             json.dumps({"id": "long", "context": "x" * 9000, "question": "q"}).encode(),
             b'{"id": "utf", "context": "\xff\xfe", "question": "q"}',
             json.dumps({"id": "type", "context": 42, "question": "q"}).encode(),
             json.dumps(dict(GOOD, id="meta", source="web", depth=0.5)).encode(),
             json.dumps(dict(GOOD, id="clash", decode_s=1)).encode()]
    src.write_bytes(b"\n".join(lines) + b"\n")
    with Engine(_cfg(repo)) as engine:
        pids = engine.group.pids()
        first = engine.process_file(src, dst, progress=False)
        assert engine.group.pids() == pids and not engine.group.closed  # no restart
        recs = {r["id"]: r for r in _read(dst)}
        assert len(_read(dst)) == 7 and sorted(recs) == ["clash", "good", "line-4", "long", "meta", "short", "type"]
        assert first.documents == 7 and first.errors == 5
        for key, cause in [("short", "needs at least 4"), ("long", "exceeds the model's limit"),
                           ("line-4", "not valid UTF-8"), ("type", "must be a string"), ("clash", "'decode_s'")]:
            assert recs[key]["error_kind"] == FINAL and cause in recs[key]["error"], recs[key]
        for key in ("good", "meta"):
            assert recs[key]["error"] is None and isinstance(recs[key]["answer"], str) and recs[key]["prefill_s"] > 0
        assert (recs["meta"]["source"], recs["meta"]["depth"]) == ("web", 0.5)
        before = dst.read_text()
        again = engine.process_file(src, dst, progress=False)
        assert again.documents == 0 and again.skipped == 7 and dst.read_text() == before


# -- verify: how a row is judged -------------------------------------------------------------------

@dataclass
class Reply:
    last_logits: torch.Tensor
    tokens: list
    cache: object = None


def _reference():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    return Reference(logits, torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2), [3, 1, 4, 1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_fail_every_row(bad):
    ref = _reference()
    logits = ref.logits.clone()
    logits[7] = bad
    for exact in (True, False):
        row = judge(ref, Reply(logits, list(ref.tokens)), exact, "float32")
        assert not row["passed"] and not row["finite_logits"] and row["reason"] == "non-finite logits"


def test_approximate_rows_report_agreement_and_kl_and_pass_gates_only_when_given():
    ref = _reference()
    same = judge(ref, Reply(ref.logits.clone(), list(ref.tokens)), False, "float32")
    assert same["passed"] and same["token_agreement"] == 1.0 and abs(same["kl_div"]) < 1e-12
    off = Reply(ref.logits + torch.linspace(0, 1, 50), [3, 1, 5, 9])
    ungated = judge(ref, off, False, "float32")
    assert ungated["passed"] and ungated["token_agreement"] == 0.5 and ungated["kl_div"] > 0
    assert not judge(ref, off, True, "float32")["passed"]  # an exact method would fail it
    gated = judge(ref, off, False, "float32", Gates(max_logit_diff=0.5, min_token_agreement=0.75))
    assert not gated["passed"]
    assert "--max-logit-diff 0.5" in gated["reason"] and "--min-token-agreement 0.75" in gated["reason"]
    assert judge(ref, off, False, "float32", Gates(max_logit_diff=1.5, min_token_agreement=0.5))["passed"]


def test_an_exact_row_whose_cache_differs_says_where():
    from apb.runtime.cache import KVCache

    keys = torch.randn(3, 2, 10, 4, generator=torch.Generator().manual_seed(1))
    values = torch.randn(3, 2, 10, 4, generator=torch.Generator().manual_seed(2))
    ref = Reference(torch.zeros(5), keys, values, [1])
    got_v = values.clone()
    got_v[2, 1, 7, 3] += 5e-4  # the largest difference
    got_k = keys.clone()
    got_k[0, 0, 2, 0] += 2e-4
    row = judge(ref, Reply(torch.zeros(5), [1], KVCache(torch.arange(10), tuple(zip(got_k, got_v)))), True, "float32")
    assert not row["passed"]
    size = values[2].abs().max().item()
    assert row["reason"].startswith(f"max|dKV| 5.00e-04 > {1e-4 + 3e-5 * size:.2e} (0.0001 + 3e-05 x max|V| "
                                    f"{size:.3g} of layer 2) at V layer 2, KV head 1, position 7"), row["reason"]
    # without a comparable cache there is no place to name
    row = judge(ref, Reply(torch.zeros(5), [1], None), True, "float32")
    assert "max|dKV| inf: the cache is missing" in row["reason"] and " at " not in row["reason"]


def test_the_float32_limit_grows_with_each_layers_values():
    """Rounding grows with the values: a layer of keys near 100 may differ by 100x what a layer of
    keys near 1 may (3e-5 of the largest), each layer against its own size; the logits likewise."""
    from apb.runtime.cache import KVCache

    keys = torch.randn(2, 1, 10, 4, generator=torch.Generator().manual_seed(3))
    keys[1] *= 100 / keys[1].abs().max()  # layer 1's largest key is 100: its limit 1e-4 + 3e-3
    values = torch.randn(2, 1, 10, 4, generator=torch.Generator().manual_seed(4))
    ref = Reference(torch.linspace(-40, 40, 9), keys, values, [1])

    def row(k_delta, layer, logit_delta=0.0):
        got = keys.clone()
        got[layer, 0, 5, 1] += k_delta
        logits = ref.logits.clone()
        logits[2] += logit_delta
        cache = KVCache(torch.arange(10), tuple(zip(got, values.clone())))
        return judge(ref, Reply(logits, [1], cache), True, "float32")

    assert row(2.5e-3, 1)["passed"]  # rounding of values near 100
    assert not row(3.5e-3, 1)["passed"]
    assert not row(2.5e-3, 0)["passed"]  # the same difference in layer 0 (values near 1): not rounding
    assert "of layer 0) at K layer 0, KV head 0, position 5" in row(2.5e-3, 0)["reason"]
    assert row(0, 0, logit_delta=1.2e-3)["passed"]  # logits up to 40: limit 1.3e-3
    assert "max|dlogit| 1.40e-03 > 1.30e-03" in row(0, 0, logit_delta=1.4e-3)["reason"]


