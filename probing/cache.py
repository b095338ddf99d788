"""The on-disk feature cache: extract a frozen backbone's features once, probe them many times.

One entry per (backbone id, weights fingerprint, dataset, split, transform, layer): a safetensors file with
``embedding`` (N, D), ``label``, ``index`` and, where the data has it, ``superclass``, plus a JSON sidecar with
the full key, the file's size and its sha256. An entry is used only when the sidecar's key equals the wanted
key and the file has exactly the recorded size and checksum; anything else (a truncated or corrupt file, a
missing or unreadable sidecar, a crash between the two writes) is reported and rebuilt, never used. Both files
are written atomically (temp file + rename), the features first, so a reader never sees half an entry.

Layout: ``<root>/<backbone>/<dataset>/<split>-<layer>-<digest>.safetensors`` (+ ``.json``), where ``digest`` is
the sha256 of the canonical JSON of the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from probing.specs import slug
from report.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

#: Bump when the meaning of a cached file changes: old entries then miss instead of being misread.
CACHE_FORMAT = 1
REQUIRED_FIELDS = ("embedding", "label", "index")


def default_cache_dir() -> Path:
    """``$FMPROBE_CACHE_DIR``, else ``~/.cache/fmprobe/features``."""
    return Path(os.environ.get("FMPROBE_CACHE_DIR") or Path.home() / ".cache" / "fmprobe" / "features")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()


class CorruptCacheEntry(ValueError):
    """A cache entry that must not be used (and is rebuilt)."""


class FeatureCache:
    """Read and write feature entries under ``root``.

    Args:
        root: Cache folder (created on first write).
        enabled: False: never read, never write (``--no_cache``).
        rebuild: True: never read, always overwrite (``--rebuild_cache``).
        writable: False on non-zero DDP ranks, which read but leave writing to rank 0.
    """

    def __init__(self, root: str | Path | None = None, enabled: bool = True, rebuild: bool = False,
                 writable: bool = True):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled, self.rebuild, self.writable = enabled, rebuild, writable
        self.stats: Counter = Counter()

    def path_for(self, key: dict[str, Any]) -> Path:
        """Where the entry of ``key`` lives; ``key`` names backbone, dataset, split and layer."""
        digest = key_digest({"format": CACHE_FORMAT, **key})[:20]
        folder = self.root / slug(key["backbone"]["id"]) / slug(key["dataset"]["label"])
        return folder / f"{slug(key['split'])}-{slug(key['layer'])}-{digest}.safetensors"

    @staticmethod
    def sidecar(path: Path) -> Path:
        return path.with_suffix(".json")

    def keys(self) -> list[dict[str, Any]]:
        """The key of every entry under ``root``, from the sidecars (load() validates an entry before use)."""
        found = []
        for sidecar in sorted(self.root.rglob("*.json")):
            try:
                found.append(json.loads(sidecar.read_text())["key"])
            except (OSError, ValueError, KeyError):
                continue
        return found

    def find(self, **wanted: str) -> dict[str, torch.Tensor]:
        """The one valid entry whose key matches ``wanted`` (``backbone``: its id, ``dataset``: its label,
        ``split``, ``layer``); for inspecting a cache and for tests."""
        def matches(key):
            flat = {"backbone": key["backbone"]["id"], "dataset": key["dataset"]["label"], "split": key["split"],
                    "layer": key["layer"]}
            return all(flat[name] == value for name, value in wanted.items())

        hits = [key for key in self.keys() if matches(key)]
        if len(hits) != 1:
            raise KeyError(f"{len(hits)} cache entries match {wanted} in {self.root}")
        features = self.load(hits[0])
        if features is None:
            raise KeyError(f"the cache entry matching {wanted} is unusable")
        return features

    # -- reading ------------------------------------------------------------------------------------
    def load(self, key: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """The cached features of ``key``, or None when absent, disabled, rebuilding or invalid."""
        if not self.enabled or self.rebuild:
            return None
        path = self.path_for(key)
        if not path.exists() and not self.sidecar(path).exists():
            self.stats["misses"] += 1
            return None
        try:
            features = self._read_valid(path, key)
        except CorruptCacheEntry as error:
            self.stats["corrupt"] += 1
            log.warning("feature cache entry %s is unusable (%s); rebuilding it", path, error)
            return None
        self.stats["hits"] += 1
        return features

    def _read_valid(self, path: Path, key: dict[str, Any]) -> dict[str, torch.Tensor]:
        from safetensors.torch import load as load_safetensors

        try:
            meta = json.loads(self.sidecar(path).read_text())
        except (OSError, ValueError) as error:
            raise CorruptCacheEntry(f"sidecar {self.sidecar(path).name} missing or unreadable: {error}") from error
        if meta.get("format") != CACHE_FORMAT or canonical_json(meta.get("key")) != canonical_json(key):
            raise CorruptCacheEntry("sidecar key does not match the requested entry")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise CorruptCacheEntry(f"features file unreadable: {error}") from error
        if len(data) != meta.get("size"):
            raise CorruptCacheEntry(f"size {len(data)} bytes, expected {meta.get('size')} (truncated?)")
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            raise CorruptCacheEntry("sha256 checksum mismatch (corrupt file)")
        try:
            features = load_safetensors(data)
        except Exception as error:  # noqa: BLE001 -- any parse failure means: do not use
            raise CorruptCacheEntry(f"not a readable safetensors file: {error}") from error
        missing = [name for name in REQUIRED_FIELDS if name not in features]
        rows = {len(value) for value in features.values()}
        if missing or len(rows) != 1 or features["embedding"].ndim != 2:
            raise CorruptCacheEntry(f"inconsistent tensors (missing {missing}, row counts {sorted(rows)})")
        return features

    # -- writing ------------------------------------------------------------------------------------
    def save(self, key: dict[str, Any], features: dict[str, torch.Tensor]) -> Path | None:
        """Store ``features`` under ``key`` (features file first, then the sidecar that validates it)."""
        if not self.enabled or not self.writable:
            return None
        from safetensors.torch import save as save_safetensors

        path = self.path_for(key)
        tensors = {name: value.detach().cpu().contiguous() for name, value in features.items()}
        data = save_safetensors(tensors, metadata={"fmprobe_cache_format": str(CACHE_FORMAT),
                                                   "key": canonical_json(key)})
        atomic_write_bytes(path, data)
        atomic_write_json(self.sidecar(path), {
            "format": CACHE_FORMAT, "key": key, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "rows": int(tensors["embedding"].shape[0]), "dim": int(tensors["embedding"].shape[1]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
        self.stats["written"] += 1
        return path
