"""Embeddings out of a model: extraction in eval mode, sharded loaders, gather by sample index, seeded subsets.

Everyone may import this room (callbacks, probing, bench, models); it imports no Lightning callback.
"""
