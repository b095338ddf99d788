"""Embedding-geometry metrics as pure torch functions (no Lightning), on any device, never N x N in memory.

Import from the modules (``from geometry.knn import knn_accuracy``): re-exporting here would let the
functions ``kmeans`` and ``linear_probe`` shadow the submodules of the same name.
"""
