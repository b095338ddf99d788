"""Metric results cached beside the features: a probe run again recomputes only what changed.

The feature cache saves the forward passes; on a real-size run the metrics then dominate (Fashion-MNIST's
60,000-image bank, every block of nine networks: tens of minutes on 2 cores). A result is stored per (layer,
metric) under a key of everything that determines it:

- the content of the feature sets the metric reads: sha256 of every field (name, dtype, shape, bytes) of the
  bank, the queries and, where extracted, the novel sub-classes (for sets read from or written to the feature
  cache, the sha256 of the cache file the feature cache verified, which holds the same bytes and the entry's key);
  so any change of backbone, weights, data, subset, precision or extraction code misses;
- the metric's name and every evaluation setting (``MetricSettings``, seed included);
- the code that computes it: the source of every file of ``geometry/`` (for a user's dotted-path metric, its
  module's file too). Any edit there misses, a conservative rule that never serves a stale number.

Per-query vectors (for ``--compare``'s paired tests) are stored with the values; probe.py's CKA matrices (layer x
layer, backbone x backbone) are stored the same way, keyed by the digests of the sets they compare. An entry is
one safetensors file (``<root>/.metric-results/<digest[:2]>/<digest>.safetensors``: the values and per-query
kinds as metadata, the per-query vectors as tensors) written atomically; an unreadable or inconsistent entry is
reported and computed again. ``--no_cache`` and ``--rebuild_cache`` act on it as on the features; sharded runs
(each process holding a shard) do not use it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from dataclasses import asdict
from functools import cache
from pathlib import Path
from typing import Any

import torch

from probing.cache import canonical_json
from report.io import atomic_write_bytes

log = logging.getLogger(__name__)

#: Bump when the meaning of a stored entry changes.
RESULT_FORMAT = 1
FOLDER = ".metric-results"
GEOMETRY = Path(__file__).resolve().parents[1] / "geometry"


@cache
def source_digest(files: tuple[str, ...]) -> str:
    """sha256 of the named files' contents, in order (a file that cannot be read counts by its name only)."""
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode())
        try:
            digest.update(Path(name).read_bytes())
        except OSError:
            digest.update(b"<unreadable>")
    return digest.hexdigest()


def code_digest(metric: str) -> str:
    """The digest of ``geometry/``'s sources, plus the module file of a metric named by a dotted path."""
    files = sorted(str(path) for path in GEOMETRY.rglob("*.py"))
    if "." in metric:
        from geometry.suite import resolve_metric

        try:
            files.append(str(Path(inspect.getsourcefile(resolve_metric(metric)) or "").resolve()))
        except (TypeError, OSError):  # no source (a built-in, a notebook): the name alone
            files.append(metric)
    return source_digest(tuple(files))


def tensor_digest(features: dict[str, torch.Tensor] | None) -> str | None:
    """sha256 of a feature set: every field's name, dtype, shape and bytes, fields in sorted order; for a set read
    from or written to the feature cache, the cache file's digest (``probing.cache.StoredFeatures``), which names
    the same content without reading it again (5.5 s of 7.6 GB in a full-size ``configs/probe_real.yaml`` run)."""
    if features is None:
        return None
    stored = getattr(features, "content_digest", None)
    if stored is not None:
        return stored
    digest = hashlib.sha256()
    for name in sorted(features):
        value = features[name].detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().data if value.numel() else b"")
    return digest.hexdigest()


class ResultCache:
    """Stored metric values of one probe run's cache folder (module doc); ``stats`` counts hits and writes."""

    def __init__(self, root: Path | str, enabled: bool = True, rebuild: bool = False, writable: bool = True):
        self.root = Path(root) / FOLDER
        self.enabled, self.rebuild, self.writable = enabled, rebuild, writable
        self.stats = {"hits": 0, "misses": 0, "written": 0, "unusable": 0}

    @classmethod
    def beside(cls, features_cache) -> ResultCache:
        """The result cache in a ``probing.cache.FeatureCache``'s folder, with its on / rebuild / writable state."""
        return cls(features_cache.root, features_cache.enabled, features_cache.rebuild, features_cache.writable)

    def key(self, metric: str, settings, digests: dict[str, Any]) -> str:
        """The digest naming one result: feature-set digests (``bank``, ``query``, ``novel``), metric, settings
        (None for a result that does not read them, e.g. CKA matrices)."""
        return hashlib.sha256(canonical_json({
            "format": RESULT_FORMAT, "metric": metric, "settings": None if settings is None else asdict(settings),
            "features": digests,
            "code": code_digest(metric)}).encode()).hexdigest()

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> tuple[dict[str, float], dict[str, Any]] | None:
        """``(values, per_query)`` stored under ``key``, or None (absent, disabled, rebuilding, unusable)."""
        if not self.enabled or self.rebuild:
            return None
        path = self.path_for(key)
        if not path.exists():
            self.stats["misses"] += 1
            return None
        try:
            loaded = _read(path)
        except Exception as error:  # noqa: BLE001 -- an entry that cannot be read is never used
            self.stats["unusable"] += 1
            log.warning("metric result cache entry %s is unusable (%s); computing it again", path, error)
            return None
        self.stats["hits"] += 1
        return loaded

    def save(self, key: str, values: dict[str, float], per_query: dict[str, Any]) -> None:
        """Store one result; a failed write (a full disk) warns, removes what it wrote and stops writing."""
        if not self.enabled or not self.writable:
            return
        path = self.path_for(key)
        try:
            atomic_write_bytes(path, _encode(values, per_query))
        except OSError as error:
            path.unlink(missing_ok=True)
            log.warning("metric result cache: cannot write %s (%s); not caching results from here on",
                        path, error.strerror or error)
            self.writable = False
            return
        self.stats["written"] += 1


def _encode(values: dict[str, float], per_query: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    from geometry.stats import BalancedAccuracy

    tensors, kinds = {}, {}
    for name, item in per_query.items():
        if isinstance(item, BalancedAccuracy):
            kinds[name] = "balanced"
            tensors[f"{name}/pred"], tensors[f"{name}/label"] = item.pred, item.label
        else:
            kinds[name] = "per_query"
            tensors[f"{name}/values"] = item.values
    # own copies: the vectors of several entries may share one tensor (the labels), which safetensors refuses
    tensors = {name: value.detach().cpu().clone(memory_format=torch.contiguous_format) for name, value in tensors.items()}
    metadata = {"format": str(RESULT_FORMAT), "values": json.dumps(values), "per_query": json.dumps(kinds)}
    return save(tensors, metadata=metadata)


def _read(path: Path) -> tuple[dict[str, float], dict[str, Any]]:
    from safetensors import safe_open

    from geometry.stats import BalancedAccuracy, PerQuery

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != str(RESULT_FORMAT):
            raise ValueError(f"format {metadata.get('format')!r}, expected {RESULT_FORMAT}")
        values = {name: float(value) for name, value in json.loads(metadata["values"]).items()}
        per_query: dict[str, Any] = {}
        for name, kind in json.loads(metadata["per_query"]).items():
            if kind == "balanced":
                per_query[name] = BalancedAccuracy(handle.get_tensor(f"{name}/pred"),
                                                   handle.get_tensor(f"{name}/label"))
            else:
                per_query[name] = PerQuery(handle.get_tensor(f"{name}/values"))
    return values, per_query
