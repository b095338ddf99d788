# fmprobe: the two commands a new user needs are `make demo` and `make test`.
# Both create .venv (if absent) and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fmprobe-installed

.PHONY: install demo test test-fast lint bench clean browser

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

# The report.html browser test needs Debian's chromium: install it when we can (root with apt-get), else say why
# the test will be skipped; never fail the build over it.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "chromium: no apt-get here, the browser test will be skipped"; \
	elif [ "$$(id -u)" != "0" ]; then echo "chromium: not root, cannot apt-get install it; the browser test will be skipped"; \
	else (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)) >/dev/null 2>&1 \
		|| echo "chromium: apt-get install failed, the browser test will be skipped"; fi

test: $(STAMP) browser
	$(PY) -m ruff check .
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -p no:cacheprovider

# The inner loop: everything but subprocess, DDP and whole-pipeline runs (marked slow), in about a minute.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -p no:cacheprovider -m "not slow" -x

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf runs lightning_logs .pytest_cache .ruff_cache
