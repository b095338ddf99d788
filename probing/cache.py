"""The on-disk feature cache: extract a frozen backbone's features once, probe them many times.

One entry per (backbone id, weights fingerprint, dataset, split, transform, layer): a safetensors file with
``embedding`` (N, D), ``label``, ``index`` and, where the data has it, ``superclass``, plus a JSON sidecar with
the full key, the file's size and its sha256. An entry is used only when the sidecar's key equals the wanted
key and the file has exactly the recorded size and checksum (or is unchanged since they matched: below);
anything else (a truncated or corrupt file, a missing or unreadable sidecar, a crash between the two writes) is
reported and rebuilt, never used. Both files are written atomically (temp file + rename), the features first,
so a reader never sees half an entry.

Reading a full-size cache again (7.6 GB for ``configs/probe_real.yaml``) would cost more than the metrics it
saves, so an entry is checksummed once: the sidecar records the file's size, inode, mtime and ctime as they were
when its sha256 was last verified (at write, or at the first read of an older entry), and an entry whose stat is
unchanged is trusted, as git trusts its index and ccache its direct mode. It is then memory-mapped, not read: a
probe run whose metric values are all in the result cache touches only the few tensors it draws. Any write to
the file changes its ctime, which no program can set back, so a changed, truncated or replaced file is
checksummed again (and re-stamped when it passes). A stamp is trusted only when it was taken after the file's
last clock tick (see :func:`stat_stamp`); what a stamp cannot see is a disk flipping bits under an unchanged
inode: ``--rebuild_cache`` is the cure for a disk you distrust.

Layout: ``<root>/<backbone>/<dataset>/<split>-<layer>-<digest>.safetensors`` (+ ``.json``), where ``digest`` is
the sha256 of the canonical JSON of the key.

A cache folder that cannot be written (read-only, no permission, not a folder) is detected when the cache is
opened, before any extraction: the run goes on without writing the cache (existing entries are still read), with
a warning naming the folder. A write that fails later (a full disk) removes what it wrote, warns naming the
file, and stops writing for the rest of the run; the run itself continues.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from probing.specs import slug
from report.io import atomic_write_chunks, atomic_write_json

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


def unwritable_reason(folder: Path) -> str | None:
    """Why files cannot be created in ``folder`` (or where it would be created), or None when they can."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:  # os.access misses read-only mounts: really create (and remove) a file
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return f"{existing}: {error.strerror or error}"
    return None


def _clock_ns() -> int:
    """The clock file timestamps are taken from (Linux: the coarse real-time clock, one tick per 1-10 ms)."""
    coarse = getattr(time, "CLOCK_REALTIME_COARSE", None)
    return time.clock_gettime_ns(coarse) if coarse is not None else time.time_ns()


def _stat_fields(path: Path) -> dict[str, int]:
    st = os.stat(path)
    return {"size": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def stat_stamp(path: Path, wait_s: float = 0.05) -> dict[str, int] | None:
    """The stat of a file whose content was just verified, with ``checked_ns``: when the stamp was taken.

    A write within the same clock tick as the file's last change could leave its ctime as it was (git's "racily
    clean" entries), so this waits until the file-timestamp clock has moved past the ctime (at most a tick) and
    gives None (no stamp: checksummed again next time) when it does not within ``wait_s``. On a filesystem whose
    timestamps are whole milliseconds or coarser, ticks cannot be told apart: no stamp either.
    """
    fields = _stat_fields(path)
    if fields["ctime_ns"] % 1_000_000 == 0:
        return None
    deadline = time.monotonic() + wait_s
    while (now := _clock_ns()) <= fields["ctime_ns"]:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.001)
    return {**fields, "checked_ns": now}


def trusts_stamp(path: Path, stamp: Any) -> bool:
    """Whether ``path`` is unchanged since ``stamp`` (see :func:`stat_stamp`) was taken."""
    if not isinstance(stamp, dict) or not isinstance(stamp.get("checked_ns"), int):
        return False
    try:
        fields = _stat_fields(path)
    except OSError:
        return False
    return all(stamp.get(name) == value for name, value in fields.items()) and stamp["checked_ns"] > fields["ctime_ns"]


#: safetensors' names of the dtypes a feature file can hold, in the order of its ``Dtype`` enum (files list
#: their tensors by dtype, last in this order first, then by name).
_SAFETENSORS_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
                       torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32",
                       torch.float64: "F64", torch.int64: "I64"}
_DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(_SAFETENSORS_DTYPES)}


def safetensors_pieces(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> list:
    """A safetensors file as pieces to write one after another: the header, then each tensor's own buffer.

    The bytes are those of ``safetensors.torch.save`` (tested): tensors ordered by dtype (``_SAFETENSORS_DTYPES``)
    then name, the header padded with spaces to 8 bytes; except that ``metadata`` is written in key order, where
    ``save`` writes it in the order of a per-process random hash map (so re-extracted features gave files with
    other bytes, and other digests). ``save`` builds the file in memory and copies it twice
    (0.8 s of each 1.9 s save of a 60,000 x 1,280 feature file); these pieces are views of the tensors.
    """
    cpu = {name: value.detach().cpu().contiguous() for name, value in tensors.items()}
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    pieces: list = []
    offset = 0
    for name, value in cpu.items():
        if value.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"feature field {name!r} has dtype {value.dtype}, which the feature cache cannot store")
    for name in sorted(cpu, key=lambda n: (-_DTYPE_RANK[cpu[n].dtype], n)):
        value = cpu[name]
        size = value.numel() * value.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[value.dtype], "shape": list(value.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
        pieces.append(memoryview(value.reshape(-1).view(torch.uint8).numpy()) if size else b"")
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return [len(text).to_bytes(8, "little") + text, *pieces]


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
        if self.enabled and self.writable:
            problem = unwritable_reason(self.root)
            if problem:
                log.warning("feature cache %s cannot be written (%s): running without caching new features "
                            "(set --cache_dir to a writable folder, or --no_cache)", self.root, problem)
                self.writable = False
                self.stats["unwritable"] = 1

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
    def load(self, key: dict[str, Any]) -> StoredFeatures | None:
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

    def _read_valid(self, path: Path, key: dict[str, Any]) -> StoredFeatures:
        from safetensors.torch import load as load_safetensors
        from safetensors.torch import load_file

        try:
            meta = json.loads(self.sidecar(path).read_text())
        except (OSError, ValueError) as error:
            raise CorruptCacheEntry(f"sidecar {self.sidecar(path).name} missing or unreadable: {error}") from error
        if meta.get("format") != CACHE_FORMAT or canonical_json(meta.get("key")) != canonical_json(key):
            raise CorruptCacheEntry("sidecar key does not match the requested entry")
        trusted = trusts_stamp(path, meta.get("stat")) and meta["stat"]["size"] == meta.get("size")
        try:
            if trusted:  # unchanged since its checksum passed: mapped, read page by page when used
                features = load_file(path)
            else:
                features = load_safetensors(self._checksummed(path, meta))
        except CorruptCacheEntry:
            raise
        except Exception as error:  # noqa: BLE001 -- any parse failure means: do not use
            raise CorruptCacheEntry(f"not a readable safetensors file: {error}") from error
        missing = [name for name in REQUIRED_FIELDS if name not in features]
        rows = {len(value) for value in features.values()}
        if missing or len(rows) != 1 or features["embedding"].ndim != 2:
            raise CorruptCacheEntry(f"inconsistent tensors (missing {missing}, row counts {sorted(rows)})")
        if not trusted and self.writable:  # verified now: stamped, so the next run maps it without reading
            stamp = stat_stamp(path)
            if stamp is not None:
                try:
                    atomic_write_json(self.sidecar(path), {**meta, "stat": stamp})
                except OSError:
                    pass  # still valid, only checksummed again next time
        return StoredFeatures(features, meta["sha256"])

    def _checksummed(self, path: Path, meta: dict[str, Any]) -> bytes:
        """The file's bytes, once their size and sha256 match the sidecar's."""
        self.stats["checksummed"] += 1
        try:
            data = path.read_bytes()
        except OSError as error:
            raise CorruptCacheEntry(f"features file unreadable: {error}") from error
        if len(data) != meta.get("size"):
            raise CorruptCacheEntry(f"size {len(data)} bytes, expected {meta.get('size')} (truncated?)")
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            raise CorruptCacheEntry("sha256 checksum mismatch (corrupt file)")
        return data

    # -- writing ------------------------------------------------------------------------------------
    def save(self, key: dict[str, Any], features: dict[str, torch.Tensor]) -> Path | None:
        """Store ``features`` under ``key`` (features file first, then the sidecar that validates it)."""
        written = self._write(key, features)
        return None if written is None else written[0]

    def stored(self, key: dict[str, Any], features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``save``, then the features as the cache will serve them (``StoredFeatures`` with the file's digest),
        or unchanged when nothing was written (cache off, read-only, a failed write)."""
        written = self._write(key, features)
        return features if written is None else StoredFeatures(features, written[1])

    def _write(self, key: dict[str, Any], features: dict[str, torch.Tensor]) -> tuple[Path, str] | None:
        if not self.enabled or not self.writable:
            return None
        path = self.path_for(key)
        pieces = safetensors_pieces(features, metadata={"fmprobe_cache_format": str(CACHE_FORMAT),
                                                        "key": canonical_json(key)})
        digest = hashlib.sha256()
        embedding = features["embedding"]
        sidecar = {"format": CACHE_FORMAT, "key": key, "size": sum(len(piece) for piece in pieces),
                   "rows": int(embedding.shape[0]), "dim": int(embedding.shape[1]),
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            atomic_write_chunks(path, _hashed(pieces, digest))
            sidecar["sha256"] = sha256 = digest.hexdigest()
            stamp = stat_stamp(path)  # the bytes are the ones just hashed: trusted while the file is unchanged
            atomic_write_json(self.sidecar(path), sidecar if stamp is None else {**sidecar, "stat": stamp})
        except OSError as error:  # e.g. the disk filled up: no half entry, no more writes, the run goes on
            for written in (self.sidecar(path), path):
                written.unlink(missing_ok=True)
            log.warning("feature cache: cannot write %s (%s); running without caching from here on",
                        path, error.strerror or error)
            self.writable = False
            self.stats["write_failed"] += 1
            return None
        self.stats["written"] += 1
        return path, sha256


def _hashed(pieces: list, digest) -> Iterator[memoryview]:
    """The pieces in 16 MB slices, each added to ``digest`` as it is handed on (hashed while in the CPU cache)."""
    for piece in pieces:
        view = memoryview(piece).cast("B")
        for start in range(0, len(view), 1 << 24):
            part = view[start : start + (1 << 24)]
            digest.update(part)
            yield part


class StoredFeatures(dict):
    """A feature set as the cache stores it: the tensors, and ``content_digest`` naming their content.

    The digest is the sha256 of the cache file (its tensors' names, dtypes, shapes and bytes, and the entry's key),
    which the cache computes anyway to verify a read; the metric result cache keys on it
    (``probing.result_cache.tensor_digest``) instead of hashing the tensors a second time. Copies and
    derived dicts are plain dicts again, and are hashed.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], file_sha256: str):
        super().__init__(tensors)
        self.content_digest = f"cache-file-sha256:{file_sha256}"
