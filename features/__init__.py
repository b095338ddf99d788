"""Embeddings out of a model: extraction in eval mode, sharded loaders, gather by sample index, seeded subsets;
and ``progress``: plain progress lines (a Lightning progress bar) when output goes to a log file, shared by
train.py's fits and probe.py's extraction.

Everyone may import this room (callbacks, probing, bench, models); it imports no Lightning callback.
"""
