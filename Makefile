# Quick start: `make demo`, `make test`. Both build .venv on first use.
# The CPU torch wheel is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.apb-installed

.PHONY: demo test install clean gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/apb demo --config configs/tiny-cpu.yaml

test: $(STAMP)
	$(VENV)/bin/pytest -q tests

# on a CUDA machine: kernels, apb verify at W=1 (and W=2 with two GPUs), apb bench at 32K-128K
gpu-check: $(STAMP)
	$(PY) -m apb.tools.gpu_check --json docs/results/gpu-check.json

clean:
	rm -rf $(VENV) build *.egg-info
