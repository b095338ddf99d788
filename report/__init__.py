"""What a run leaves behind for people: atomic file writes, results files, tables, figures in one shared style
(``style.py``) and the self-contained ``report.html`` page (``html.py``).

Everyone may import this room (callbacks, probing, bench, entry scripts); it imports only ``geometry`` and
third-party libraries.
"""
