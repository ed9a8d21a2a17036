"""apb simulate / bench / eval on tiny inputs: the harnesses, not the figures."""

import json
import subprocess

import pytest

from apb.tools import simulate as costmodel


def test_reference_prediction_meets_the_bar():
    rows = costmodel.compare_reference()
    assert len(rows) == 24
    hits = [r for r in rows if r["within_tolerance"]]
    assert len(hits) / len(rows) >= 0.8
    for r in rows:
        if r["ratio"] is not None:
            assert r["ratio"] == pytest.approx(r["predicted_s"] / r["published_s"])


def test_cost_model_orders_methods_as_the_algorithms_imply():
    m, d = costmodel.MODELS["llama-3.1-8b"], costmodel.DEVICES["H100"]
    t = {k: costmodel.predict(k, 131072, 8, m, d).seconds for k in ("ring", "star", "apb")}
    full = costmodel.predict("full", 131072, 1, m, d).seconds
    assert t["apb"] < t["star"] < t["ring"] < full
    # memory: one device cannot hold a 1M-token prefill of an 8B model, eight can with apb
    assert costmodel.predict("full", 1 << 20, 1, m, d).seconds is None
    assert costmodel.predict("apb", 1 << 20, 8, m, d).seconds is not None


def test_simulate_cli_json(apb_bin, tmp_path):
    out = tmp_path / "sim.json"
    proc = subprocess.run([apb_bin, "simulate", "--reference", "apb-paper", "--json", str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cells within +-30%" in proc.stdout
    rows = json.loads(out.read_text())["results"]
    assert {r["method"] for r in rows} == {"full", "ring", "star", "apb"}


def test_bench_harness_on_a_tiny_run(apb_bin, repo, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run([apb_bin, "bench", "--config", str(repo / "configs/tiny-cpu.yaml"), "--model", "tiny-llama",
                           "--methods", "full,ring,apb", "--lengths", "256,512", "--world-size", "2", "--repeats", "1",
                           "--json", str(out), "--plot", str(png)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [(r["method"], r["length"]) for r in rows] == [(m, n) for n in (256, 512) for m in ("full", "ring", "apb")]
    for r in rows:
        assert r["wall_s"] > 0 and r["projected_s"] > 0 and len(r["rank_comm_bytes"]) == 2
        assert r["projected_speedup_vs_full"] > 0 and r["projected_speedup_vs_ring"] > 0
    ring = next(r for r in rows if r["method"] == "ring" and r["length"] == 256)
    # ring at W=2: per layer one step of K and V for 128 tokens, 4 KV heads x 16 dims, float32, 2 layers
    # (+ the logits broadcast from the host holding the last token)
    assert min(ring["rank_comm_bytes"]) >= 2 * (2 * 128 * 4 * 16 * 4)
    full = next(r for r in rows if r["method"] == "full" and r["length"] == 256)
    assert full["projected_speedup_vs_full"] == pytest.approx(1.0)
    assert "projected on 2 dedicated cores" in report["labels"]["projected_s"]
    assert png.stat().st_size > 1000


def test_eval_scores_answers_against_a_dataset(apb_bin, repo, tmp_path):
    from apb.engine import Engine

    docs = [{"id": f"q{i}", "context": f"Some context number {i}. " * 20, "question": "What?"} for i in range(2)]
    with Engine.from_config(repo / "configs/tiny-cpu.yaml", method="full", max_new_tokens=16) as e:
        got = [r["answer"] for r in e.process(docs)]
    data = tmp_path / "mine.jsonl"
    # the first record's expected answer is what the model says, the second's is not
    data.write_text(json.dumps(docs[0] | {"answer": got[0]}) + "\n" + json.dumps(docs[1] | {"answer": got[1] + "x"})
                    + "\n")
    out = tmp_path / "eval.json"
    proc = subprocess.run([apb_bin, "eval", "--config", str(repo / "configs/tiny-cpu.yaml"), "--model", "tiny-llama",
                           "--methods", "full,ring", "--world-size", "2", "--data", str(data), "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(r["method"], r["accuracy"], r["n"], r["task"]) for r in rows] == [("full", 0.5, 2, "mine"),
                                                                               ("ring", 0.5, 2, "mine")]


def test_tasks_module_writes_a_dataset_per_task(tmp_path):
    import sys

    out = tmp_path / "docs.jsonl"
    proc = subprocess.run([sys.executable, "-m", "apb.tools.tasks", "--out", str(out), "--tasks", "passkey,vt", "--n", "2",
                           "--length", "300", "--model", "tiny-llama"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [d["id"] for d in docs] == ["passkey-300-0", "passkey-300-1", "vt-300-0", "vt-300-1"]
    for d in docs:
        assert d["answer"] and d["question"] and d["context"]
        if d["id"].startswith("vt"):
            # every name of the chain is assigned in the context, the first one the asked value
            names = d["answer"].split()
            value = d["question"].split()[-1].rstrip("?")
            assert f"VAR {names[0]} = {value}." in d["context"]
            for prev, cur in zip(names, names[1:]):
                assert f"VAR {cur} = VAR {prev}." in d["context"]
    bad = subprocess.run([sys.executable, "-m", "apb.tools.tasks", "--out", str(out), "--tasks", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "valid tasks" in bad.stderr
