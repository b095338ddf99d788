"""Test-wide settings: never touch the network, never prompt."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
# Tests mirror the package (tests/geometry/test_knn.py tests geometry/knn.py) and are imported with
# --import-mode=importlib, so two rooms may both hold a test_continual.py; shared helpers (fakes.py, helpers/)
# are imported from tests/.
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
