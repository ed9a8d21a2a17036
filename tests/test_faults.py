"""Fault injection: a host lost in the middle of a prefill, a host that stops answering, and the
driver killed in the middle of a batch. Each asserts that nothing is lost and nothing duplicated:
one record per input, every good document answered as a clean run answers it."""

import json
import os
import signal
import subprocess
import time

import pytest

from apb.engine import Engine
from apb.parallel import groups

DOCS = [{"id": f"doc-{i}", "context": f"Document {i}. " + "The sky is blue and the grass is green. " * (10 + 10 * i),
         "question": f"What colour is item {i}?", "max_new_tokens": 3} for i in range(3)]


@pytest.fixture(scope="module")
def clean_answers(repo):
    with Engine.from_config(repo / "configs/tiny-cpu.yaml", method="apb", max_new_tokens=3) as e:
        return [r["answer"] for r in e.process(DOCS)]


def test_host_killed_mid_prefill_is_retried_on_a_fresh_group(repo, tmp_path, monkeypatch, clean_answers):
    """Rank 1 SIGKILLs itself at layer 1 of the first document's prefill (tests/_faulty_workers.py):
    that document is tried again on a new group and answered as a clean run answers it."""
    monkeypatch.setitem(groups.LAUNCHERS, "local", "_faulty_workers:DieMidPrefillGroup")
    monkeypatch.setenv("PYTHONPATH", str(repo / "tests"))
    monkeypatch.setenv("APB_DIE_ONCE", str(tmp_path / "died"))
    with Engine.from_config(repo / "configs/tiny-cpu.yaml", method="apb", max_new_tokens=3) as e:
        recs = list(e.process(DOCS))
    assert (tmp_path / "died").exists()  # the fault did fire
    assert [r["id"] for r in recs] == [d["id"] for d in DOCS]
    assert [r["error"] for r in recs] == [None] * 3
    assert [r["answer"] for r in recs] == clean_answers


def test_host_that_stops_answering_times_out_and_the_batch_goes_on(repo, clean_answers):
    """SIGSTOP on rank 1 between documents: the next call times out (parallel.timeout_s), the group
    is rebuilt and that document answered; so is the one after it."""
    with Engine.from_config(repo / "configs/tiny-cpu.yaml", method="apb", max_new_tokens=3,
                            overrides={"parallel.timeout_s": 10}) as e:
        first = e.process_one(DOCS[0])
        stopped = e.group.pids()[1]
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        second = e.process_one(DOCS[1])
        waited = time.monotonic() - t0
        third = e.process_one(DOCS[2])
        assert stopped not in e.group.pids()
    assert [first["error"], second["error"], third["error"]] == [None] * 3
    assert [first["answer"], second["answer"], third["answer"]] == clean_answers
    assert waited >= 10  # it did wait for the timeout, then went on


def test_driver_killed_mid_batch_then_resumed(apb_bin, repo, tmp_path):
    """`apb run` SIGKILLed once two records are on disk, a torn half line left after them as a kill
    during a write leaves one; the re-run keeps the finished records as they were (not recomputed),
    drops the torn line, and writes exactly one record per input."""
    # enough documents that the kill lands mid-batch: each takes tens of milliseconds here
    docs = [dict(d, id=f"doc-{i}") for i, d in enumerate(DOCS * 10)]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cmd = [apb_bin, "run", "--config", str(repo / "configs/tiny-cpu.yaml"), "--method", "ring", "--input", str(src),
           "--output", str(dst), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not dst.exists() or len(dst.read_text().splitlines()) < 2):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, as a lost machine would
    proc.wait()
    finished = dst.read_text().splitlines()
    assert 2 <= len(finished) < len(docs)
    with dst.open("a") as f:
        f.write(finished[-1][: len(finished[-1]) // 2])  # a record cut short by the kill
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    lines = dst.read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert sorted(r["id"] for r in recs) == sorted(d["id"] for d in docs)  # one each, none twice
    assert lines[:len(finished)] == finished  # kept as written: the same prefill times, not recomputed
    assert all(r["error"] is None for r in recs)
    assert f"{len(docs) - len(finished)} documents (0 errors, {len(finished)} already done)" in again.stdout


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])  # the parent pid
    return False


def _torchrun_rank(rank: int, ancestor: int) -> int | None:
    """The pid of torchrun worker ``rank`` started under process ``ancestor`` (from /proc)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            mine = b"apb.cli.torchrun_main" in cmd and f"RANK={rank}".encode() in env and \
                _descends_from(int(pid), ancestor)
        except OSError:
            continue
        if mine:
            return int(pid)
    return None


def test_torchrun_rank_killed_stops_the_batch_and_keeps_what_is_done(apb_bin, repo, tmp_path):
    """Under torchrun a dead rank cannot be replaced: the run stops with a non-zero status and a
    message, the records already written stay, and a re-run answers the rest."""
    # enough documents that the kill lands mid-batch: each takes tens of milliseconds here
    docs = [dict(d, id=f"doc-{i}") for i, d in enumerate(DOCS * 10)]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cmd = [apb_bin, "run", "--config", str(repo / "configs/tiny-cpu.yaml"), "--launcher", "torchrun",
           "--world-size", "2", "--method", "ring", "--set", "parallel.timeout_s=60", "--input", str(src),
           "--output", str(dst), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not dst.exists() or not dst.read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    victim = _torchrun_rank(1, proc.pid)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "apb: a worker failed" in err or "ChildFailedError" in err or "failed" in err.lower(), err[-2000:]
    kept = dst.read_text().splitlines()
    assert 1 <= len(kept) < len(docs) and all(json.loads(x)["error"] is None for x in kept if x.strip().endswith("}"))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    recs = [json.loads(x) for x in dst.read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == sorted(d["id"] for d in docs)
    assert all(r["error"] is None for r in recs)


def test_ray_actor_killed_mid_prefill_is_retried_on_a_fresh_group(repo, tmp_path, monkeypatch, clean_answers):
    """The same fault under Ray: rank 1's actor SIGKILLs itself at layer 1 of the first prefill."""
    import ray

    marker = tmp_path / "died"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(repo / "tests"), "APB_DIE_ONCE": str(marker)}})
    try:
        monkeypatch.setitem(groups.LAUNCHERS, "ray", "_faulty_workers:DieMidPrefillRayGroup")
        with Engine.from_config(repo / "configs/tiny-cpu.yaml", method="apb", launcher="ray", max_new_tokens=3) as e:
            recs = list(e.process(DOCS))
    finally:
        ray.shutdown()
    assert marker.exists()
    assert [r["error"] for r in recs] == [None] * 3
    assert [r["answer"] for r in recs] == clean_answers


def test_a_refusal_inside_a_worker_is_final_and_not_retried(repo, monkeypatch, clean_answers):
    """A ValueError raised in the workers (a deliberate refusal) becomes a final error record at
    once, without a retry; the group is rebuilt (peers may be inside a collective) and the batch
    goes on."""
    monkeypatch.setitem(groups.LAUNCHERS, "local", "_faulty_workers:RefusingGroup")
    monkeypatch.setenv("PYTHONPATH", str(repo / "tests"))
    docs = [DOCS[0], dict(DOCS[1], max_new_tokens=7), DOCS[2]]
    started = []
    real = groups.start_group

    def counting(*args, **kwargs):
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr("apb.engine.groups.start_group", counting, raising=False)
    with Engine.from_config(repo / "configs/tiny-cpu.yaml", method="apb", max_new_tokens=3) as e:
        recs = list(e.process(docs))
    assert recs[1]["error_kind"] == "final" and recs[1]["error"].startswith("refused by a worker: ")
    assert recs[1]["error"] == "refused by a worker: layer 3 does something this runtime refuses; use another model"
    assert [recs[0]["answer"], recs[2]["answer"]] == [clean_answers[0], clean_answers[2]]
    assert len(started) == 2  # one group up to the refusal, a fresh one after it: no retry in between
