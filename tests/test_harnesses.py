"""apb simulate / bench / eval on tiny inputs: the harnesses, not the figures."""

import json
import subprocess

import pytest
import torch

from apb.config import MethodConfig
from apb.methods import Method, build_method, method_class, method_names
from apb.methods.cost import Sizes
from apb.tools import simulate as costmodel
from apb.tools.bench import rates_drift
from apb.tools.calibrate import Rates

# The APB paper's prefill table (Llama-3.1-8B, 8 x A800, seconds; None = OOM), copied from
# design.md rather than read from costmodel.REFERENCE, so a refit of either one shows up here.
PUBLISHED_LENGTHS = [32768, 65536, 131072, 262144, 524288, 1048576]
PUBLISHED = {
    "full": [3.46, 9.51, 30.01, None, None, None],
    "ring": [0.72, 2.00, 6.34, 21.80, 81.62, None],
    "star": [0.67, 1.43, 3.50, 9.63, 30.43, None],
    "apb": [0.49, 1.09, 2.79, 5.53, 13.39, 37.6],
}


def test_reference_prediction_meets_the_published_table():
    predicted = {(r["method"], r["length"]): r["predicted_s"] for r in costmodel.compare_reference()}
    assert len(predicted) == 24
    hits = 0
    for method, cells in PUBLISHED.items():
        for n, published in zip(PUBLISHED_LENGTHS, cells):
            got = predicted[method, n]
            if published is None or got is None:  # an OOM cell is met only when both say OOM
                hits += published is None and got is None
            else:
                hits += abs(got / published - 1) <= 0.30
    assert hits >= 20, f"{hits}/24 cells of the APB paper's table within 30%"
    # the OOM boundary is the memory model's: one A800 fits 128K tokens, not 256K
    assert predicted["full", 131072] is not None and predicted["full", 262144] is None


@pytest.mark.parametrize("name", method_names())
def test_every_method_states_its_cost_with_the_sizes_its_plan_uses(name, monkeypatch):
    cls = method_class(name)
    assert cls.cost.__func__ is not Method.cost.__func__, f"method {name!r} has no cost formula"
    shape = costmodel.MODELS["llama-3.1-8b"]
    n, w, layers = 16384, 4, 3  # block 4096: every default size is a whole number of tokens

    def both():
        plan = build_method(name, MethodConfig()).plan(n, w, 0, layers)
        work = cls.cost(n, w, shape, Sizes(query=0))
        if plan is None:  # a method without sizes
            assert work.anchor == work.passing == 0
        else:
            assert plan.anchor_len == work.anchor and plan.passing == (work.passing,) * layers
        return work

    default = both()
    # one rule feeds both: change it and plan() and cost() move together
    monkeypatch.setattr(cls, "default_sizes", classmethod(lambda c, n_ctx, block: (block / 2, block / 16)))
    changed = both()
    assert (changed.anchor != default.anchor) == (default.anchor != 0)


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
    out, png, trace = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "trace.json"
    proc = subprocess.run([apb_bin, "bench", "--config", str(repo / "configs/tiny-cpu.yaml"), "--model", "tiny-llama",
                           "--methods", "full,ring,apb", "--lengths", "256,512", "--world-size", "2", "--repeats", "1",
                           "--hf-baseline", "--json", str(out), "--plot", str(png), "--trace", str(trace)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [(r["method"], r["length"]) for r in rows] == [(m, n) for n in (256, 512)
                                                          for m in ("full", "ring", "apb", "hf-sdpa")]
    hf = next(r for r in rows if r["method"] == "hf-sdpa" and r["length"] == 512)
    assert hf["wall_s"] > 0 and hf["world_size"] == 1 and hf["projected_speedup_vs_full"] > 0
    events = json.loads(trace.read_text())["traceEvents"]
    named = {e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert named == {f"{m} n={n} W=2" for m in ("full", "ring", "apb") for n in (256, 512)}
    pid = next(e["pid"] for e in events if e["name"] == "process_name" and e["args"]["name"] == "ring n=256 W=2")
    ring_row = next(r for r in rows if r["method"] == "ring" and r["length"] == 256)
    for rank in (0, 1):
        spans = [e for e in events if e.get("pid") == pid and e.get("tid") == 2 * rank and e["ph"] == "X"]
        # the embedding, then each of the 2 layers, one after the other
        assert [e["name"] for e in spans] == ["embed", "layer 0", "layer 1"]
        assert all(a["ts"] + a["dur"] <= b["ts"] + 1 for a, b in zip(spans, spans[1:]))
        calls = [e for e in events if e.get("pid") == pid and e.get("tid") == 2 * rank + 1 and e["ph"] == "X"]
        assert sum(1 for e in calls if e["name"] == "ring_send_recv") == 2  # one step per layer at W=2
        assert sum(e["args"]["bytes"] for e in calls) == ring_row["rank_comm_bytes"][rank]
    for r in (r for r in rows if r["method"] != "hf-sdpa"):
        assert r["wall_s"] > 0 and r["projected_s"] > 0 and len(r["rank_comm_bytes"]) == 2
        # each rank's fastest clock per layer over the repeats: never above the median run's own
        assert r["projected_fastest_s"] <= r["projected_s"] + 1e-12
        assert [len(run) for run in r["rank_layer_cpu_s_by_repeat"]] == [2] * r["repeats"]
        assert r["projected_speedup_vs_full"] > 0 and r["projected_speedup_vs_ring"] > 0
    ring = next(r for r in rows if r["method"] == "ring" and r["length"] == 256)
    # ring at W=2: per layer one step of K and V for 128 tokens, 4 KV heads x 16 dims, float32, 2 layers
    # (+ the logits broadcast from the host holding the last token)
    assert min(ring["rank_comm_bytes"]) >= 2 * (2 * 128 * 4 * 16 * 4)
    # and each host keeps its 128 tokens' K and V of both layers
    assert ring["rank_kv_mib"] == [2 * 2 * 128 * 4 * 16 * 4 / 2**20] * 2
    full = next(r for r in rows if r["method"] == "full" and r["length"] == 256)
    assert full["projected_speedup_vs_full"] == pytest.approx(1.0)
    # the cost model's ideal: ring halves the slowest host's work (a bit less: the zigzag's diagonals),
    # at either rate; the ideal seconds are the work at the rates the report states
    rates = report["rates"]
    assert rates["dtype"] == "float32" and rates["device"] == "cpu"
    assert rates["attn_s_per_gflop"] > 0 and rates["linear_s_per_gflop"] > 0
    for key in ("ideal_speedup_vs_full", "flop_speedup_vs_full"):
        assert full[key] == pytest.approx(1.0) and 1.7 < ring[key] <= 2.0
    assert ring["ideal_s"] == pytest.approx(ring["attn_gflop_slowest_host"] * rates["attn_s_per_gflop"]
                                            + ring["linear_gflop_slowest_host"] * rates["linear_s_per_gflop"])
    assert ring["efficiency_vs_full"] == pytest.approx(ring["projected_speedup_vs_full"] / ring["ideal_speedup_vs_full"])
    assert "ideal: the cost model's work at this device's rates" in proc.stdout
    # the rates were measured before the rows too, and how far they moved is reported and printed
    before = report["rates_before"]
    assert before["attn_s_per_gflop"] > 0 and before["linear_s_per_gflop"] > 0
    assert report["rates_drift"] == pytest.approx(rates_drift(Rates(**before), Rates(**rates)))
    assert f"{report['rates_drift']:.0%} off those measured before the rows" in proc.stdout
    for r in (r for r in rows if r["method"] != "hf-sdpa"):  # a worker holding torch and a model: tens of MiB
        assert len(r["rank_peak_mem_mib"]) == 2 and all(p > 20 for p in r["rank_peak_mem_mib"])
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
    for r in rows:
        assert r["stderr"] == pytest.approx(0.5 ** 0.5 / 2) and r["errors"] == 0
        assert 0.0 <= r["agreement_with_full"] <= 1.0
    per_doc = [json.loads(line) for line in open(f"{out}.docs.jsonl")]
    assert [(d["id"], sorted(d["answers"])) for d in per_doc] == [("q0", ["full", "ring"]), ("q1", ["full", "ring"])]


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


def test_the_cost_model_takes_the_configs_sizes():
    """`apb simulate` and bench's ideal cost each method at the run's sizes, not silently at its
    defaults: every layer exact costs apb a balanced exact method's attention plus its anchor,
    whole passing blocks cost more than the default."""
    m, d = costmodel.MODELS["llama-3.1-8b"], costmodel.DEVICES["H100"]
    n, w, q = 131072, 8, 128

    def pairs(method, **options):
        sizes = Sizes(query=q).with_method(build_method(method, MethodConfig(**options)).config)
        return costmodel.host_work(method, n, w, m, sizes).pairs

    b, a = n / w, n / w / 4  # apb's default anchor: block/4
    ring = costmodel.host_work("ring", n, w, m).pairs
    share = a / (w - 1)  # the default split anchor: host W-2's share over the whole anchor
    assert pairs("apb", exact_layers=m.layers) == pytest.approx(share * a - share * share / 2 + n * n / 2 / w + q * n / w)
    assert ring < pairs("apb", exact_layers=m.layers) < pairs("apb", passing_len="all")
    assert pairs("apb") < pairs("apb", exact_layers=8) < pairs("apb", exact_layers=m.layers)
    # a per-layer list: the mean of the layers' work
    half = ["all"] * 16 + [None] * 16
    assert pairs("apb", passing_len=half) == pytest.approx((pairs("apb") + pairs("apb", passing_len="all")) / 2)
    assert pairs("spava", passing_len=half) > pairs("spava")
    assert pairs("spava") < pairs("spava", exact_layers=4) < pairs("spava", exact_layers=m.layers)
    with pytest.raises(ValueError, match="passing_len has 2 entries but the model has 32 layers"):
        pairs("apb", passing_len=["all", 16])
    rows = costmodel.scenario(["ring", "apb"], [n], [w], "llama-3.1-8b", "H100",
                              method_config=MethodConfig(exact_layers=8))
    default = costmodel.scenario(["ring", "apb"], [n], [w], "llama-3.1-8b", "H100")
    assert rows[0] == default[0] and rows[1]["predicted_s"] > default[1]["predicted_s"]


def test_simulate_cli_runs_at_the_configs_sizes(apb_bin):
    def run(*extra):
        return subprocess.run([apb_bin, "simulate", "--lengths", "131072", "--world-sizes", "8", *extra],
                              capture_output=True, text=True, timeout=120)

    default, exact = run("--methods", "apb"), run("--methods", "apb", "--set", "method.exact_layers=8")
    assert default.returncode == exact.returncode == 0, default.stderr + exact.stderr
    assert float(exact.stdout.split()[-1]) > float(default.stdout.split()[-1])
    bad = run("--methods", "apb", "--set", "method.passing_len=[all,16]")
    assert bad.returncode == 2 and "passing_len has 2 entries but the model has 32 layers" in bad.stderr
    ref = run("--reference", "apb-paper", "--set", "method.anchor_len=0.5")
    assert ref.returncode == 2 and "method.anchor_len would not apply" in ref.stderr


def test_the_fastest_projection_takes_each_ranks_fastest_clock_per_layer_over_the_repeats():
    from apb.tools.bench import _projected, best_layer_clocks

    def stats(clocks, sent=0):  # one rank's stats: {(phase, layer): cpu seconds}
        return {"layer_cpu": [{"phase": p, "layer": l, "cpu_s": c} for (p, l), c in clocks.items()],
                "ops": [{"phase": "context", "layer": 0, "op": "all_gather", "calls": 1, "bytes": sent,
                         "seconds": 0.0}]}

    # two ranks, three repeats; a noisy repeat on either rank must not become the layer's time
    runs = [[stats({("context", -1): 0.1, ("context", 0): 1.0, ("context", 1): 2.0}, 10**9),
             stats({("context", -1): 0.1, ("context", 0): 1.9, ("context", 1): 1.0})],
            [stats({("context", -1): 0.3, ("context", 0): 1.5, ("context", 1): 2.0}, 10**9),
             stats({("context", -1): 0.1, ("context", 0): 1.2, ("context", 1): 1.4})],
            [stats({("context", -1): 0.1, ("context", 0): 1.1, ("context", 1): 2.6}, 10**9),
             stats({("context", -1): 0.2, ("context", 0): 1.6, ("context", 1): 0.9})]]
    best = best_layer_clocks(runs)
    assert [{(x["phase"], x["layer"]): x["cpu_s"] for x in b["layer_cpu"]} for b in best] == [
        {("context", -1): 0.1, ("context", 0): 1.0, ("context", 1): 2.0},
        {("context", -1): 0.1, ("context", 0): 1.2, ("context", 1): 0.9}]
    projected, compute, comm = _projected(best, bandwidth=1e9)
    # per layer the slowest rank's fastest clock: 0.1 + 1.2 + 2.0; rank 0's 1 GB at 1 GB/s + one call
    assert compute == pytest.approx(3.3) and comm == pytest.approx(1.0 + 20e-6)
    assert projected == pytest.approx(compute + comm)
    # from any one run's clocks alone the projection is higher: the noise of whichever rank it hit
    assert all(_projected(run, 1e9)[0] > projected for run in runs)
    assert best[0]["ops"] == runs[0][0]["ops"]  # bytes and calls from the run's own counters


def test_bench_ideal_weighs_each_kind_of_work_at_its_own_rate():
    from apb.tools.bench import add_ideals
    from apb.tools.calibrate import Rates

    def row(method, attn, linear, projected):
        return {"method": method, "length": 1024, "attn_gflop_slowest_host": attn, "linear_gflop_slowest_host": linear,
                "wall_s": projected, "projected_s": projected}

    # ring: 100 GFLOP of attention, 10 linear; apb: 40 and 12. Per-token work 3x dearer per FLOP.
    rows = [row("ring", 100.0, 10.0, 1.50), row("apb", 40.0, 12.0, 0.80)]
    add_ideals(rows, Rates(attn_s_per_gflop=0.01, linear_s_per_gflop=0.03, dtype="float32"))
    ring, apb = rows
    assert ring["ideal_s"] == pytest.approx(1.0 + 0.3) and apb["ideal_s"] == pytest.approx(0.4 + 0.36)
    assert apb["ideal_speedup_vs_ring"] == pytest.approx(1.30 / 0.76)
    assert apb["flop_speedup_vs_ring"] == pytest.approx(110 / 52)  # one rate for every FLOP
    assert apb["projected_speedup_vs_ring"] == pytest.approx(1.5 / 0.8)
    assert apb["efficiency_vs_ring"] == pytest.approx((1.5 / 0.8) / (1.30 / 0.76))
    assert ring["efficiency_vs_ring"] == pytest.approx(1.0)
    assert "ideal_speedup_vs_full" not in apb  # no full row at this length
    # without measured rates the FLOP ratio is still given, and no ideal is invented
    rows = [row("ring", 100.0, 10.0, 1.50), row("apb", 40.0, 12.0, 0.80)]
    add_ideals(rows, None)
    assert "ideal_speedup_vs_ring" not in rows[1] and rows[1]["flop_speedup_vs_ring"] == pytest.approx(110 / 52)


def test_calibration_forward_does_everything_but_attention():
    """The per-token rate's forward is the model's own with a zero attention output: the same
    logits as transformers' eager forward of the model with its attention output projections
    zeroed (a llama has no o_proj bias), and far from the real forward's."""
    from apb.model.catalog import resolve_model
    from apb.model.loading import load_model
    from apb.tools.calibrate import _NoAttention, rest_lengths

    path = resolve_model("tiny-llama", 0)
    model = load_model(path, "float32", "cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(64)[None]
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=pos, use_cache=False, apb_ctx=_NoAttention()).logits
        real = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        ref_model = load_model(path, "float32", "cpu", attn_implementation="eager")
        for layer in ref_model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
        ref = ref_model(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (got - real).abs().max() > 1e-2
    # the rest's lengths: the longer near the target's linear work, within the bounds, a multiple of 64
    shape = costmodel.ModelShape.from_config(model.config)
    short, long = rest_lengths(shape, target_gflop=shape.linear_flops(1000) / 1e9)
    assert (short, long) == (960 // 4, 960)
    assert rest_lengths(shape, target_gflop=1e-9) == (64, 256)
    assert rest_lengths(shape, target_gflop=1e9) == (2048, 8192)
    assert rest_lengths(shape, target_gflop=1e9, max_positions=1000) == (240, 960)  # within the model's positions
    assert rest_lengths(shape, target_gflop=1e9, max_tokens=65536) == (16384, 65536)  # a GPU's bound (GPU_SCALE)


def test_bench_labels_say_what_the_columns_are_on_each_device(monkeypatch):
    """A CPU's cores; a GPU's, and on GPUs shared by ranks that the times are not separate GPUs'."""
    from apb.tools.bench import _labels

    cpu = _labels(2, torch.device("cpu"), False, 100.0)
    assert "2 dedicated cores" in cpu["projected_s"] and "sharing" in cpu["wall_s"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    shared = _labels(2, torch.device("cuda", 0), True, 100.0)
    assert "2 dedicated GPUs" in shared["projected_s"] and "not the time of separate GPUs" in shared["wall_s"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    own = _labels(2, torch.device("cuda", 0), True, 100.0)  # enough GPUs: share_gpus changes nothing
    assert "separate" not in own["wall_s"] and "shared" not in own["projected_s"]


def test_bench_ideal_flops_are_at_the_runs_sizes():
    from types import SimpleNamespace

    from apb.tools.bench import _model_flop

    cfg = SimpleNamespace(num_hidden_layers=4, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                          head_dim=32, intermediate_size=512, vocab_size=1000)
    default = _model_flop("apb", 8192, 4, cfg, 32, MethodConfig())
    assert default == _model_flop("apb", 8192, 4, cfg, 32)
    assert _model_flop("apb", 8192, 4, cfg, 32, MethodConfig(passing_len="all"))[0] > default[0]
    # a variant's sizes count too: apb:uncompressed passes whole blocks with no anchor
    assert _model_flop("apb:uncompressed", 8192, 4, cfg, 32, MethodConfig()) == \
        _model_flop("apb", 8192, 4, cfg, 32, MethodConfig(anchor_len=0, passing_len="all"))


def test_bench_keeps_its_rows_when_the_rates_cannot_be_measured(monkeypatch):
    from apb.config import load_config
    from apb.tools import bench

    def busy(model):
        raise RuntimeError("the per-token rate could not be measured: (the machine is too busy?)")

    monkeypatch.setattr(bench, "measure_rates", busy)
    said = []
    report = bench.run_bench(load_config(None), ["full"], [128], 1, repeats=1, progress=said.append)
    (row,) = report["results"]
    assert row["wall_s"] > 0 and row["projected_speedup_vs_full"] == pytest.approx(1.0)
    assert "ideal_speedup_vs_full" not in row and "ideal_s" not in row
    assert report["rates"] is None and "too busy" in report["rates_error"]
    assert report["rates_before"] is None and report["rates_drift"] is None
    assert any(s.startswith("no ideal speedups: ") for s in said)
    assert "ideal:" not in bench.format_table(report)


def test_bench_runs_its_repeats_in_rounds_over_the_methods(monkeypatch):
    """A slow spell of a shared machine must fall on every method alike: each method warms up,
    then the repeats go A, B, A, B, not A, A, B, B; each row's repeats are its own method's."""
    from apb.config import load_config
    from apb.tools import bench

    order, real = [], bench.start_group

    def recording(*args, **kwargs):
        group = real(*args, **kwargs)
        call = group.call

        def spy(name, req, *a, **kw):
            order.append(req.method)
            return call(name, req, *a, **kw)

        group.call = spy
        return group

    monkeypatch.setattr(bench, "start_group", recording)
    monkeypatch.setattr(bench, "_measure_rates", lambda *a: (None, "not measured here"))
    report = bench.run_bench(load_config(None), ["full", "ring"], [96], 1, repeats=2, progress=lambda s: None)
    assert order == ["full", "ring"] * 3
    assert [(r["method"], len(r["wall_all_s"])) for r in report["results"]] == [("full", 2), ("ring", 2)]


def test_rates_drift_is_the_larger_relative_change():
    before = Rates(0.010, 0.020, "float32", "cpu")
    assert rates_drift(before, Rates(0.011, 0.015, "float32", "cpu")) == pytest.approx(0.25)  # per-token 20 -> 15
    assert rates_drift(before, before) == 0.0
    assert rates_drift(None, before) is None and rates_drift(before, None) is None


def test_sliding_layers_cost_their_window_not_the_prompt():
    """The bench's attention FLOPs (and so its ideal) count a sliding layer as what every method
    runs there, the host's rows times the window's keys, not as a global layer: checked against
    the pairs an explicit sliding mask keeps (an upper bound by the rows near the prompt's start,
    at most w**2/2 a layer), and a window as long as the prompt is a global layer."""
    from transformers import AutoConfig

    from apb.model.features import sliding_windows
    from apb.tools.bench import _model_flop

    dims = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=128, vocab_size=512)
    gemma2 = AutoConfig.for_model("gemma2", sliding_window=64, **dims)  # sliding and global layers alternate
    assert sliding_windows(gemma2) == (64, 64)
    assert sliding_windows(AutoConfig.for_model("mistral", sliding_window=32, **dims)) == (32,) * 4
    assert sliding_windows(AutoConfig.for_model("llama", **dims)) == ()
    n, w = 1000, 64
    i = torch.arange(n)
    d = i[:, None] - i[None, :]
    causal, sliding = int((d >= 0).sum()), int(((d >= 0) & (d < w)).sum())
    per_pair = 4 * 4 * 16 / 1e9
    attn, _ = _model_flop("full", n, 1, gemma2, 0)
    exact = per_pair * (2 * causal + 2 * sliding)
    assert exact <= attn <= exact + per_pair * 2 * w * w / 2
    llama = AutoConfig.for_model("llama", **dims)
    assert attn < _model_flop("full", n, 1, llama, 0)[0] / 1.7  # two of four layers: 64 keys a row, not 500
    assert _model_flop("full", 50, 1, gemma2, 0) == _model_flop("full", 50, 1, llama, 0)  # window >= prompt
    # every method's sliding layers: its rows, each with the window's keys
    ring, _ = _model_flop("ring", n, 4, gemma2, 0)
    assert ring == pytest.approx(_model_flop("ring", n, 4, llama, 0)[0] / 2 + per_pair * 2 * (n / 4) * w)


def _counted_flops(model, n: int) -> float:
    """FLOPs torch counts in the model's own forward over ``n`` tokens (no head)."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model(ids)
    return float(counter.get_total_flops())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-phi3", "tiny-gpt-oss", "tiny-deepseek-v3", "qwen2-moe"])
def test_the_cost_model_counts_the_flops_the_models_forward_runs(name, tmp_path):
    """Linear plus attention FLOPs of the cost model's shape against torch's FLOP counter over
    transformers' own forward (eager attention computes the whole square; eager experts run each
    token through its top-k only): exact for dense layers, experts (gpt-oss with biases; a
    Qwen2-MoE with a shared expert and every other layer dense) and DeepSeek's MLA. Before, the
    shape took one dense MLP of ``intermediate_size`` and ``head_dim`` for every head (gpt-oss:
    0.6x, DeepSeek: 1.15x the counted FLOPs)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from apb.model.catalog import resolve_model

    if name == "qwen2-moe":
        cfg = AutoConfig.for_model("qwen2_moe", vocab_size=256, hidden_size=64, intermediate_size=96,
                                   moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=6,
                                   num_experts_per_tok=3, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, decoder_sparse_step=2, mlp_only_layers=[])
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path, safe_serialization=True)
        path = tmp_path
    else:
        path = resolve_model(name)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                 experts_implementation="eager").eval()
    shape = costmodel.ModelShape.from_config(model.config)
    n = 48
    modelled = shape.linear_flops(n) + n * n * shape.attn_flops_per_pair() * shape.layers
    assert modelled == pytest.approx(_counted_flops(model, n), rel=1e-9)
    assert shape.params == sum(p.numel() for p in model.parameters())


def test_the_cost_models_cache_is_what_the_prefill_caches():
    """K/V bytes per token and layer: MLA's latent pair for DeepSeek-V3 (what apb.model.mla caches),
    K and V of every KV head elsewhere; measured on a real prefill's cache."""
    from transformers import AutoConfig

    from apb.model.catalog import resolve_model
    from apb.model.loading import load_model
    from apb.parallel.comm import Comm
    from apb.runtime.prefill import prefill

    for name in ("tiny-deepseek-v3", "tiny-llama"):
        path = resolve_model(name)
        shape = costmodel.ModelShape.from_config(AutoConfig.from_pretrained(path))
        n = 40
        res = prefill(load_model(path), torch.randint(0, 256, (n,)), build_method("full", MethodConfig()), Comm(None))
        cached = res.cache.keys[:, :, :n].numel() + res.cache.values[:, :, :n].numel()
        assert shape.kv_bytes(n) == cached * shape.bytes_per_param, name
