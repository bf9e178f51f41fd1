# Two commands: `make demo` and `make test`. Each creates/refreshes .venv when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-16)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# Ray clusters started by the demo/tests run without token auth (see DESIGN.md, Ray conventions).
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
# Ray Train's controller polls workers every 2 s and each report() waits for that poll: on these small
# local runs (epochs well under a second) that wait would dominate, so poll often.
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S := 0.1

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test]' $(TORCH_PINS)
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/demo.py

test: $(STAMP)
	$(PY) -m pytest -q --durations=30 tests

bench: $(STAMP)
	$(PY) -m engine.bench

clean:
	rm -rf $(VENV) runs .pytest_cache
