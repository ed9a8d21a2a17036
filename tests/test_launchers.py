"""The same job through Ray and through torchrun (W=2 on CPU): identical answers, resumable."""

import json
import os
import signal
import subprocess

import pytest

from apb.parallel.groups.ray import local_ranks, rank_order

DOCS = [{"id": f"d{i}", "context": "Alpha beta gamma delta. " * (30 + 25 * i), "question": f"Which letter {i}?",
         "max_new_tokens": 5} for i in range(3)]
# a mixed batch: empty, missing field, too short for spava at W=2 (needs 4 context tokens), too long
# for the model (8192 positions), not UTF-8, a wrong type; and a good one with metadata to carry
BAD = [{"id": "bad", "context": "", "question": "q"}, {"id": "bad2", "question": "q"},
       {"id": "short", "context": "A", "question": "q?"}, {"id": "long", "context": "x" * 9000, "question": "q"},
       b'{"id": "utf", "context": "\xff\xfe", "question": "q"}', {"id": "type", "context": 42, "question": "q"},
       dict(DOCS[0], id="meta", source="web", depth=0.5)]
#: per id, what its error record must name (None: answered)
CAUSES = {"bad": "empty", "bad2": "missing field 'context'", "short": "needs at least 4", "long": "exceeds the model's limit",
          "line-7": "not valid UTF-8", "type": "must be a string", "meta": None}


def _jsonl(path, recs):
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in recs))


def _run(apb_bin, repo, launcher, src, dst):
    return subprocess.run([apb_bin, "run", "--config", str(repo / "configs/tiny-cpu.yaml"), "--launcher", launcher,
                           "--world-size", "2", "--method", "spava", "--input", str(src), "--output", str(dst),
                           "--no-progress"], capture_output=True, text=True, timeout=600)


def test_every_launcher_gives_the_same_answers_to_a_mixed_batch(apb_bin, repo, tmp_path):
    """spava at W=2 under local, Ray and torchrun: one record per input, each bad document an error
    record naming its cause (final: kept on resume), the good ones answered alike everywhere."""
    src = tmp_path / "in.jsonl"
    _jsonl(src, DOCS[:2] + BAD + DOCS[2:])
    outs = {}
    for launcher in ("local", "ray", "torchrun"):
        dst = tmp_path / f"{launcher}.jsonl"
        proc = _run(apb_bin, repo, launcher, src, dst)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        recs = [json.loads(x) for x in dst.read_text().splitlines()]
        assert [r["id"] for r in recs] == ["d0", "d1", *CAUSES, "d2"], launcher
        for r in recs:
            cause = CAUSES.get(r["id"])
            if cause is None:
                assert r["error"] is None and isinstance(r["answer"], str), (launcher, r)
            else:
                assert r["error_kind"] == "final" and cause in r["error"], (launcher, r)
        meta = next(r for r in recs if r["id"] == "meta")
        assert (meta["source"], meta["depth"]) == ("web", 0.5)
        outs[launcher] = {r["id"]: r["answer"] for r in recs}
        if launcher == "torchrun":  # a second run adds nothing: every record is settled (answers, final errors)
            before = dst.read_text()
            proc = _run(apb_bin, repo, launcher, src, dst)
            assert proc.returncode == 0 and dst.read_text() == before, proc.stdout + proc.stderr
    assert outs["local"] == outs["ray"] == outs["torchrun"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def test_unsatisfiable_placement_names_the_resources(ray_local):
    from apb.config import RayConfig
    from apb.parallel.groups import WorkerError
    from apb.parallel.groups.ray import RayWorkerGroup

    cfg = RayConfig(cpus_per_worker=64, start_timeout_s=5)
    with pytest.raises(WorkerError, match=r"cannot place 2 workers of \{'CPU': 64.0\}.*the cluster has"):
        RayWorkerGroup(2, cfg, worker_kwargs={"device": "cpu"})


def test_ray_actor_death_fails_one_document_and_the_batch_goes_on(ray_local, repo):
    from apb.engine import Engine

    # no retry, so the failure itself is recorded (test_engine checks that a retry answers it)
    with Engine.from_config(repo / "configs/tiny-cpu.yaml", {"parallel.max_retries": 0}, method="ring",
                            launcher="ray", max_new_tokens=3) as e:
        results, killed = [], None
        for i, rec in enumerate(e.process(DOCS)):
            results.append(rec)
            if i == 0:
                killed = e.group.pids()[1]  # rank 1's actor dies between documents 0 and 1
                os.kill(killed, signal.SIGKILL)
        survivors = e.group.pids()  # the group rebuilt for document 2
    assert [r["id"] for r in results] == ["d0", "d1", "d2"]
    ok = [results[0], results[2]]
    assert all(r["error"] is None and isinstance(r["answer"], str) and r["prompt_tokens"] > 0 for r in ok), ok
    dead = results[1]
    assert dead["answer"] is None and dead["prompt_tokens"] > 0 and dead["error_kind"] == "transient", dead
    # only the worker-failure path writes this; which rank reports first is a race: the killed actor
    # (Ray: "actor died", with its pid) or a peer whose collective broke ("a worker failed")
    assert dead["error"].startswith("worker failure (tried once): a worker"), dead["error"]
    assert "during 'run_prompt'" in dead["error"], dead["error"]
    assert f"pid: {killed}" in dead["error"] or "failed during 'run_prompt'" in dead["error"], dead["error"]
    assert killed not in survivors


def test_a_model_the_ray_workers_refuse_stops_the_run_with_their_own_reason(ray_local, repo, tmp_path):
    """As with local workers (test_engine): Phi's half rotary refused by apb's query check, which
    only the loaded model shows, on the Ray actors. Ray wraps the worker's ValueError in its own
    task error with a traceback; the run stops with one ConfigError whose reason is the worker's
    own message (``WorkerError.reason``), naming the fix, and no Ray wrapping."""
    from apb.config import ConfigError
    from apb.engine import Engine
    from test_engine import GOOD, _checkpoint

    path = _checkpoint(repo, tmp_path, "phi", partial_rotary_factor=0.5)
    with Engine.from_config(repo / "configs/tiny-cpu.yaml", model=str(path), method="apb", launcher="ray",
                            world_size=2, max_new_tokens=2) as e:
        with pytest.raises(ConfigError) as refused:
            e.process_one(GOOD[0])
    message = str(refused.value)
    assert "refused by the workers before any document: " in message and "query_positions: anchor" in message
    reason = message.split("refused by the workers before any document: ", 1)[1]
    assert reason.startswith("the query compressor scores with the query moved"), reason
    for wrapping in ("Traceback", "RayTaskError", "ray::", "\n"):
        assert wrapping not in reason, (wrapping, reason)


def test_rank_order_groups_by_node_rank0_node_first():
    where = [{"node_id": "b"}, {"node_id": "a"}, {"node_id": "b"}, {"node_id": "a"}]
    order = rank_order(where)
    assert order == [0, 2, 1, 3]
    assert local_ranks([where[i] for i in order]) == [0, 1, 0, 1]


def test_ray_workers_are_not_restarted_by_bad_documents(ray_local, repo, tmp_path):
    """The mixed batch through the Python API on Ray: the same actors (pids) before and after it."""
    from apb.engine import Engine

    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _jsonl(src, DOCS[:2] + BAD)  # the same lines as above: the UTF-8 one is line 7
    with Engine.from_config(repo / "configs/tiny-cpu.yaml", method="spava", launcher="ray", world_size=2,
                            max_new_tokens=3) as e:
        before = e.group.pids()
        e.process_file(src, dst, progress=False)
        assert e.group.pids() == before
    recs = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["d0", "d1", *CAUSES]
    assert [r["error"] is None for r in recs] == [True, True] + [c is None for c in CAUSES.values()]
