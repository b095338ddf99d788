"""Frozen-feature probing (``probe.py``): extract once through Lightning, cache on disk, measure with ``geometry/``.

- ``specs``: what the user names (backbones with their weights, datasets by short name or class path).
- ``cache``: the on-disk feature cache (safetensors + checksummed sidecar, atomic writes).
- ``extract``: extraction through ``Trainer.predict`` (DDP-exact via ``features.extract``) behind the cache.
- ``evaluate``: the metric rows, CKA between backbones and between layers, all computed by ``geometry/``.
- ``synthetic_real``: seed 000's report: generated vs real embeddings of shared and novel sub-classes.
- ``report`` / ``plots``: results.csv, results.json, the terminal table and the PNG figures.
"""
