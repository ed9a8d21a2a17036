import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _hermetic_cache(tmp_path_factory):
    # presets are materialised here, not in the user's ~/.cache; spawned workers inherit the variable
    os.environ["APB_CACHE"] = str(tmp_path_factory.mktemp("apb-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    yield


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def apb_bin() -> str:
    return str(Path(sys.executable).with_name("apb"))
