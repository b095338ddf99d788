"""Facts about the software a run used, recorded beside its numbers."""

from __future__ import annotations

import platform


def versions() -> dict[str, str]:
    """Python, torch, Lightning, timm and transformers versions."""
    import lightning
    import timm
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "timm": timm.__version__, "transformers": transformers.__version__}
