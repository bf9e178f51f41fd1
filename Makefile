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

.PHONY: demo test bench venv compiled clean

# The venv is filled by uv (from PyPI, like pip): parallel downloads and bytecode compilation, and a wheel
# cache shared by venvs, so a fresh clone's install is ~1.5 min with an empty cache and ~40 s with a warm
# one, against 2-3 min for pip (measured on a 2-core box, README). uv reads no pip config: a constraint file
# configured for pip (this machine caps torch that way) is passed on, and TLS uses the system's certificates.
UV := $(VENV)/bin/uv
PIP_CONSTRAINTS := $(or $(PIP_CONSTRAINT),$(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^global\.constraint='\(.*\)'$$/\1/p"))
export UV_NATIVE_TLS := 1

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q 'uv>=0.13,<1'
	$(UV) pip install -q --python $(PY) --compile-bytecode $(addprefix --constraint ,$(PIP_CONSTRAINTS)) \
		$(TORCH_PINS) -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

# The engine's own modules compiled once: where PYTHONDONTWRITEBYTECODE is set (this machine sets it), every
# process (each Ray worker) would compile them again at import.
compiled: $(STAMP)
	@$(PY) -m compileall -q engine jobs > /dev/null

demo: compiled
	$(PY) jobs/demo.py

test: compiled
	$(PY) -m pytest -q --durations=30 tests

bench: compiled
	$(PY) -m engine.bench

clean:
	rm -rf $(VENV) runs .pytest_cache
