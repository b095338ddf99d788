"""Loggers as fmprobe users need them: wandb that never prompts and never hangs without a network.

``WandbLogger`` is Lightning's, with one decision made for the user: when no API key is configured
(``WANDB_API_KEY`` or a ``~/.netrc`` entry for api.wandb.ai) or the wandb server cannot be reached within
two seconds, the run is logged *offline* into the run directory and the message says how to upload it
later (``wandb sync <dir>``). ``offline: true/false`` in the config overrides the detection.
"""

from __future__ import annotations

import netrc
import os
import socket
from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info

WANDB_HOST = "api.wandb.ai"


def wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_reachable(timeout_s: float = 2.0) -> bool:
    host = os.environ.get("WANDB_BASE_URL", f"https://{WANDB_HOST}").split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host.split(":")[0], 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def wandb_should_be_offline() -> tuple[bool, str]:
    """(offline?, why) from the environment: WANDB_MODE, an API key, and whether the server answers."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True, f"WANDB_MODE={mode}"
    if not wandb_api_key_configured():
        return True, "no wandb API key (set WANDB_API_KEY or run `wandb login`)"
    if not wandb_reachable():
        return True, f"{WANDB_HOST} is not reachable"
    return False, ""


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger; offline automatically when there is no key or no network.

    Args:
        project: wandb project.
        entity: wandb entity (user or team); None uses your default.
        group: Run group (e.g. one sweep or one experiment family).
        tags: Run tags.
        name: Run name; None uses train.py's ``run_name``.
        save_dir: Where the local wandb files go; None uses the run directory.
        offline: Force offline (true) or online (false); None detects (no key / no network -> offline).
        log_model: Upload checkpoints as wandb artifacts (Lightning's ``log_model``).
        **kwargs: Passed to ``wandb.init``.
    """

    def __init__(
        self,
        project: str = "fmprobe",
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        name: str | None = None,
        save_dir: str | None = None,
        offline: bool | None = None,
        log_model: bool | str = False,
        **kwargs,
    ):
        if offline is None:
            offline, why = wandb_should_be_offline()
            if offline:
                rank_zero_info(f"wandb: logging offline ({why}); upload later with `wandb sync {save_dir or '<run dir>'}/wandb/offline-run-*`")
        if offline:
            os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        save_dir = save_dir or "."
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(project=project, entity=entity, group=group, tags=tags, name=name, save_dir=save_dir,
                         offline=offline, log_model=log_model, **kwargs)


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger whose files go to ``<run dir>/logs`` unless ``save_dir`` says otherwise.

    Args:
        save_dir: Folder of the event files; None: the run directory (train.py fills it in).
        name: Sub-folder name.
        version: Version sub-folder.
        **kwargs: Passed to Lightning's TensorBoardLogger.
    """

    def __init__(self, save_dir: str | None = None, name: str = "", version: str | None = "logs", **kwargs):
        super().__init__(save_dir=save_dir or ".", name=name, version=version, **kwargs)
