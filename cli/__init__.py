"""What the two entry scripts (train.py, probe.py) share: one-line errors, run-directory rules, early checks.

Nothing here imports torch or Lightning at module level: an error in a command line or a config file is
reported before the heavy libraries load.
"""
