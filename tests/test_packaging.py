"""The install layout: apb is the only import root; kernels/ and parallel/ live under it."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("name", ["kernels", "parallel"])
def test_top_level_names_are_not_importable_elsewhere(tmp_path, repo, name):
    code = (f"import importlib.util, sys; s = importlib.util.find_spec({name!r}); "
            f"sys.exit(0 if s is None or not str(s.origin).startswith({str(repo)!r}) else 1)")
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path).returncode == 0


def test_subpackages_import_under_apb(tmp_path):
    code = "import apb.kernels, apb.parallel.layout, apb.methods; print(apb.kernels.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "apb.kernels"


def test_transformers_does_not_take_our_kernels_for_its_own(tmp_path, repo):
    code = ("from transformers.utils import import_utils as u; import importlib.util; "
            "s = importlib.util.find_spec('kernels'); "
            f"print(u.is_kernels_available(), s is not None and str(s.origin).startswith({str(repo)!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    available, ours = out.stdout.split()
    assert ours == "False"
    # in this (test) interpreter too: pytest must not have put the repo root on sys.path
    import importlib.util

    spec = importlib.util.find_spec("kernels")
    assert spec is None or not str(spec.origin).startswith(str(repo))


def test_console_script_and_module_entry(apb_bin, tmp_path):
    for cmd in ([apb_bin, "--help"], [sys.executable, "-m", "apb", "--help"]):
        out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0 and "verify" in out.stdout, out.stderr
