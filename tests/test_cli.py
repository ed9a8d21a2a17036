"""The apb command as a user runs it (subprocesses)."""

import json
import subprocess

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


def test_ulysses_head_mismatch_is_an_error_row(apb_bin, repo):
    # 12 heads cannot be split over 5 hosts: the row reports why instead of crashing the run
    proc = subprocess.run([apb_bin, "verify", "--config", str(repo / "configs/tiny-cpu.yaml"), "--methods", "ulysses",
                           "--world-size", "5", "--prompt-len", "64"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "num_attention_heads=12 is not divisible by world_size=5" in proc.stdout
