"""cache_io: writing and re-reading one full-size feature-cache entry (Fashion-MNIST's bank at 1,280 dims).

- write: ``FeatureCache.save`` (the tensors' own buffers, hashed as written) vs what it did before: safetensors'
  ``save`` to bytes, sha256 of them, an atomic write of them. Both write the same tensors; the files must hold
  the same tensors and the same header (``save`` lists metadata in a per-process order, so bytes may differ).
- read: ``FeatureCache.load`` of an entry unchanged since its checksum passed (memory-mapped) vs a reader that
  cannot trust it (read whole, sha256-verified, parsed); once touching the embedding (a metric that runs), once
  only looking it up (a metric whose value comes from the result cache). The OS page cache holds the file in
  both: this times fmprobe, not the disk.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch

from bench.common import Result, timed_pair

FULL = {"rows": 60000, "dim": 1280}
QUICK = {"rows": 2000, "dim": 64}
KEY = {"backbone": {"id": "bench", "fingerprint": "x"}, "dataset": {"label": "fashion-mnist"}, "split": "train",
       "layer": "final"}


def _features(rows: int, dim: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"embedding": torch.randn(rows, dim, generator=generator), "label": torch.arange(rows) % 10,
            "index": torch.arange(rows), "superclass": torch.arange(rows) % 3}


def _reference_write(path: Path, key: dict, features: dict[str, torch.Tensor]) -> str:
    """The cache's write before streaming: the whole file built in memory, hashed, written atomically, then its
    sidecar (as ``FeatureCache.save`` writes one)."""
    from safetensors.torch import save

    from probing.cache import CACHE_FORMAT, canonical_json
    from report.io import atomic_write_bytes, atomic_write_json

    data = save(features, metadata={"fmprobe_cache_format": str(CACHE_FORMAT), "key": canonical_json(key)})
    sha256 = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(path, data)
    atomic_write_json(path.with_suffix(".json"), {"format": CACHE_FORMAT, "key": key, "size": len(data),
                                                  "sha256": sha256})
    return sha256


def _header(path: Path) -> dict:
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(size))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[name], b[name]) for name in a)


def run(quick: bool, device: str) -> list[Result]:
    from safetensors.torch import load_file

    from probing.cache import FeatureCache

    size = QUICK if quick else FULL
    features = _features(size["rows"], size["dim"])
    megabytes = sum(value.numel() * value.element_size() for value in features.values()) / 2**20
    what = f"{size['rows']:,} x {size['dim']:,} entry ({megabytes:.0f} MB)"
    results = []
    with tempfile.TemporaryDirectory(prefix="fmprobe-bench-cache-io-") as root:
        cache = FeatureCache(Path(root) / "ours")
        reference_path = Path(root) / "reference.safetensors"
        ours_t, ref_t = timed_pair(lambda: cache.save(KEY, features),
                                   lambda: _reference_write(reference_path, KEY, features), repeats=3)
        ours_path = ours_t.value
        same = _same(load_file(ours_path), load_file(reference_path)) and _header(ours_path) == _header(
            reference_path)
        results.append(Result(
            "cache_io", f"write one {what}: streamed vs safetensors.save + sha256 + write", ours_t.seconds,
            ref_t.seconds, ref_t.seconds / ours_t.seconds, "x faster", "≥ 1.2×", ref_t.seconds / ours_t.seconds >= 1.2,
            "same tensors and header" if same else "files differ", same,
            {"ours": ours_t.peak_mb, "reference": ref_t.peak_mb}))

        trusting = FeatureCache(cache.root)
        # the same entry in a second, read-only cache whose sidecar has no stamp: read whole and checksummed
        checking = FeatureCache(Path(root) / "unstamped", writable=False)
        copy = checking.path_for(KEY)
        copy.parent.mkdir(parents=True)
        shutil.copyfile(ours_path, copy)
        meta = json.loads(cache.sidecar(ours_path).read_text())
        meta.pop("stat")
        checking.sidecar(copy).write_text(json.dumps(meta))

        for touched in (True, False):
            def use(load, touched=touched):
                loaded = load()
                return float(loaded["embedding"].sum()) if touched else loaded["label"][:1].clone()

            ours_t, ref_t = timed_pair(lambda: use(lambda: trusting.load(KEY)), lambda: use(lambda: checking.load(KEY)),
                                       repeats=3)
            agrees = (ours_t.value == ref_t.value) if touched else bool(torch.equal(ours_t.value, ref_t.value))
            agrees = agrees and trusting.stats["checksummed"] == 0 and checking.stats["checksummed"] > 0
            results.append(Result(
                "cache_io", f"read the {what} again, its embedding "
                + ("summed (a metric runs)" if touched else "untouched (its metric values are cached)")
                + ": memory-mapped vs read + sha256-verified", ours_t.seconds, ref_t.seconds,
                ref_t.seconds / ours_t.seconds, "x faster", "≥ 1.5×" if touched else "≥ 10×",
                ref_t.seconds / ours_t.seconds >= (1.5 if touched else 10),
                "same values; only the reference checksummed" if agrees else "values or checksums differ", agrees,
                {"ours": ours_t.peak_mb, "reference": ref_t.peak_mb}))
    return results
