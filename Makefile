# Set-up and checks. `make quickstart` on a fresh machine installs everything and runs the main job;
# `make test` runs the test suite (what CI runs).
PYTHON ?= python3
# torch is pinned so that machines with the local CPU wheel take it; override e.g. TORCH_SPEC="torch>=2.4".
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup quickstart test test-slow test-gpu clean

setup:
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[dev,eval,finetune,early-exit]" "$(TORCH_SPEC)"
	$(PYTHON) -m compress.default_model

quickstart: setup
	compress run recipes/quickstart.yaml --overwrite

test:
	$(PYTHON) -m pytest -q -m "not slow and not gpu"

test-slow:
	$(PYTHON) -m pytest -q -m "slow"

test-gpu:
	$(PYTHON) -m pytest -q -m "gpu"

clean:
	rm -rf out .pytest_cache build *.egg-info
