# fmprobe: the two commands a new user needs are `make demo` and `make test`.
# Both create .venv (if absent) and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fmprobe-installed

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -q pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) train.py fit --config configs/quickstart.yaml

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP)
	$(PY) -m ruff check .
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -p no:cacheprovider

# The inner loop: everything but subprocess, DDP and whole-pipeline runs (marked slow), in about a minute.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -p no:cacheprovider -m "not slow" -x

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf runs lightning_logs .pytest_cache .ruff_cache
