"""What a run leaves behind for people: atomic file writes, results files, tables and figures.

Everyone may import this room (callbacks, probing, bench, entry scripts); it imports only ``geometry`` and
third-party libraries.
"""
