"""The apb command as a user runs it (subprocesses)."""

import argparse
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml


def test_verify_json_and_exit_status(apb_bin, repo, tmp_path):
    out_json = tmp_path / "rows.json"
    proc = subprocess.run([apb_bin, "verify", "--config", str(repo / "configs/tiny-cpu.yaml"), "--methods",
                           "full,ring,ulysses", "--world-size", "2", "--prompt-len", "257", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out_json.read_text())["results"]
    assert [r["method"] for r in rows] == ["full", "ring", "ulysses"]
    keys = {"method", "world_size", "prompt_len", "max_abs_logit_diff", "kv_max_abs_diff", "tokens_match",
            "exact_expected", "passed"}
    for r in rows:
        assert keys <= set(r)
        assert r["passed"] and r["exact_expected"] and r["world_size"] == 2 and r["prompt_len"] == 257
        assert r["max_abs_logit_diff"] <= 1e-4
    assert "3/3 rows passed" in proc.stdout
    resolved = yaml.safe_load((tmp_path / "rows.json.config.yaml").read_text())
    assert resolved["model"]["name_or_path"] == "tiny-llama"


def test_verify_fails_a_method_whose_logits_are_not_finite(apb_bin, repo, tmp_path):
    # the workers are the real ones except that method 'apb' returns NaN logits
    # (tests/_faulty_workers.py); apb:uncompressed runs untouched beside it
    out_json = tmp_path / "rows.json"
    script = ("import sys\n"
              "from apb.parallel import groups\n"
              "groups.LAUNCHERS['local'] = '_faulty_workers:NaNLogitsGroup'\n"
              "from apb.cli import main\n"
              f"sys.exit(main(['verify', '--config', {str(repo / 'configs/tiny-cpu.yaml')!r}, '--methods', 'apb', "
              f"'--prompt-len', '200', '--tokens', '4', '--json', {str(out_json)!r}]))\n")
    python = str(Path(apb_bin).with_name("python"))
    proc = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONPATH": str(repo / "tests")})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL (non-finite logits)" in proc.stdout and "1/2 rows passed" in proc.stdout
    rows = {r["method"]: r for r in json.loads(out_json.read_text())["results"]}
    assert not rows["apb"]["passed"] and not rows["apb"]["finite_logits"] and not rows["apb"]["exact_expected"]
    assert rows["apb:uncompressed"]["passed"] and rows["apb:uncompressed"]["token_agreement"] == 1.0


def test_verify_refuses_a_row_it_cannot_run_and_runs_the_others(apb_bin, repo, tmp_path):
    # with no query, star cannot answer one and spava's compressor cannot score against one: those
    # rows are refused on the driver, naming the fix, and the others still run (the whole run used
    # to stop in a worker)
    out_json = tmp_path / "rows.json"
    proc = subprocess.run([apb_bin, "verify", "--config", str(repo / "configs/tiny-cpu.yaml"), "--methods",
                           "full,star,spava",
                           "--world-size", "2", "--prompt-len", "150", "--query-len", "0", "--tokens", "2",
                           "--json", str(out_json)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {r["method"]: r for r in json.loads(out_json.read_text())["results"]}
    assert rows["full"]["passed"] and rows["full"]["error"] is None
    assert not rows["star"]["passed"] and "n_query >= 1" in rows["star"]["error"]
    assert not rows["spava"]["passed"] and "no query tokens" in rows["spava"]["error"]
    assert rows["spava:uncompressed"]["passed"]  # nothing is scored, so no query is needed


def test_apb_scores_gpt_oss_with_the_query_at_its_true_positions(apb_bin, repo, tmp_path):
    # GPT-OSS's rotary hands apply_rotary_pos_emb one angle per pair of dims; apb's default
    # (query_positions: true) stopped every run mid-forward, it runs now, beside its exact variant
    out_json = tmp_path / "rows.json"
    proc = subprocess.run([apb_bin, "verify", "--config", str(repo / "configs/tiny-cpu.yaml"), "--model",
                           "tiny-gpt-oss", "--methods", "apb", "--world-size", "3", "--prompt-len", "300",
                           "--query-len", "4", "--tokens", "2", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["method"]: r for r in json.loads(out_json.read_text())["results"]}
    assert rows["apb"]["error"] is None and rows["apb"]["finite_logits"]
    assert rows["apb:uncompressed"]["passed"] and rows["apb:uncompressed"]["exact_expected"]


def test_unknown_method_is_rejected_before_any_work(apb_bin):
    proc = subprocess.run([apb_bin, "verify", "--methods", "full,nope"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "valid methods" in proc.stderr


def test_config_typo_names_the_key(apb_bin, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("parallel:\n  wrold_size: 2\n")
    proc = subprocess.run([apb_bin, "verify", "--config", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "wrold_size" in proc.stderr and "world_size" in proc.stderr


def test_ulysses_splits_heads_that_do_not_divide_by_the_world_size(apb_bin, repo, tmp_path):
    # 12 heads over 5 hosts: padded to 15 (3 per host), exact
    out = tmp_path / "v.json"
    proc = subprocess.run([apb_bin, "verify", "--config", str(repo / "configs/tiny-cpu.yaml"), "--methods", "ulysses",
                           "--world-size", "5", "--prompt-len", "64", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    row = json.loads(out.read_text())["results"][0]
    assert row["passed"] and row["max_abs_logit_diff"] <= 1e-4 and row["tokens_match"]


# -- error policy: user errors are one line and status 2; a bug keeps its traceback (status 1) --

def test_missing_config_file_is_one_line(apb_bin, tmp_path):
    proc = subprocess.run([apb_bin, "simulate", "--config", str(tmp_path / "missing.yaml")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("apb: config file") and proc.stderr.count("\n") == 1
    assert "missing.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_method_in_config_is_a_user_error(apb_bin):
    proc = subprocess.run([apb_bin, "simulate", "--set", "method.name=nope"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("apb: ") and "nope" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_lengths_are_rejected_by_the_parser(apb_bin):
    proc = subprocess.run([apb_bin, "simulate", "--lengths", "4096,0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--lengths: expected comma-separated positive integers, got '4096,0'" in proc.stderr


def test_internal_error_keeps_its_traceback(apb_bin):
    # a bare ValueError from inside a subcommand is a bug, not a user error
    script = ("import sys, apb.cli.simulate as s\n"
              "s.run = lambda args: int('not a number')\n"
              "from apb.cli import main\n"
              "sys.exit(main(['simulate']))\n")
    python = str(Path(apb_bin).with_name("python"))
    proc = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "invalid literal for int()" in proc.stderr


def test_main_reports_by_exception_kind(monkeypatch, capsys):
    import apb.cli.simulate
    from apb.cli import main
    from apb.cli.common import UsageError
    from apb.parallel.groups import WorkerError

    def raising(exc):
        def run(args):
            raise exc
        return run

    monkeypatch.setattr(apb.cli.simulate, "run", raising(UsageError("--lengths: too short")))
    assert main(["simulate"]) == 2
    assert capsys.readouterr().err == "apb: --lengths: too short\n"
    monkeypatch.setattr(apb.cli.simulate, "run", raising(WorkerError("rank 1 died")))
    assert main(["simulate"]) == 1
    assert capsys.readouterr().err == "apb: a worker failed, the run was stopped: rank 1 died\n"
    monkeypatch.setattr(apb.cli.simulate, "run", raising(ValueError("internal")))
    with pytest.raises(ValueError, match="internal"):
        main(["simulate"])


def test_every_subcommand_module_follows_the_convention():
    import importlib

    from apb.cli import COMMANDS, build_parser

    for name, module in COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(mod.add_parser) and callable(mod.run), module
    usage = build_parser().format_usage()
    assert all(name in usage for name in COMMANDS)


def test_help_does_not_import_torch(apb_bin):
    # `apb --help` builds every subcommand's parser: each module keeps torch inside run()
    script = ("import argparse, importlib, sys\n"
              "from apb.cli import COMMANDS\n"
              "for module in COMMANDS.values():\n"
              "    importlib.import_module(module).add_parser(argparse.ArgumentParser().add_subparsers())\n"
              "    if 'torch' in sys.modules:\n"
              "        sys.exit(f'{module} (its imports or add_parser) imports torch')\n")
    python = str(Path(apb_bin).with_name("python"))
    proc = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_command_runs_the_model_its_config_names(repo, tmp_path):
    """--model wins; else a config file or --set naming a model; only then the command's own default."""
    from apb.cli.common import model_override

    names = tmp_path / "names.yaml"
    names.write_text("model:\n  name_or_path: smollm2-135m-instruct\n")
    silent = tmp_path / "silent.yaml"
    silent.write_text("model:\n  dtype: float32\nparallel:\n  world_size: 3\n")

    def ns(model=None, config=None, overrides=()):
        return argparse.Namespace(model=model, config=config, overrides=list(overrides))

    assert model_override(ns(), "bench-attn") == ["model.name_or_path=bench-attn"]
    assert model_override(ns(config=str(silent)), "bench-attn") == ["model.name_or_path=bench-attn"]
    assert model_override(ns(config=str(names)), "bench-attn") == []
    assert model_override(ns(overrides=["model.name_or_path = tiny-qwen2"]), "bench-attn") == []
    assert model_override(ns(model="tiny-mistral", config=str(names)), "x") == ["model.name_or_path=tiny-mistral"]
    # the shipped CPU config names no model, so the documented commands keep their defaults
    assert model_override(ns(config=str(repo / "configs/tiny-cpu.yaml")), "bench-attn") == \
        ["model.name_or_path=bench-attn"]
    # and the model a config names is the one loaded
    from apb.cli.common import config_from

    assert config_from(ns(config=str(names)), model_override(ns(config=str(names)), "x")).model.name_or_path == \
        "smollm2-135m-instruct"
