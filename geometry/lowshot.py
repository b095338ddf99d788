"""Suite adapter for low-shot evaluation (DINOv2): kNN and a k-shot linear probe on n samples per class.

Both use the same seeded subsets of the bank (``geometry.knn.lowshot_subsets``); each number is the mean
over ``lowshot_n_tries`` tries. The functions themselves live beside their full-data versions:
``geometry.knn.lowshot_knn_accuracy`` and ``geometry.linear_probe.lowshot_linear_probe_accuracy``.
"""

from __future__ import annotations

from geometry.common import has_single_labels
from geometry.knn import lowshot_knn_accuracy
from geometry.linear_probe import lowshot_linear_probe_accuracy


def lowshot_metrics(bank, query, settings) -> dict[str, float]:
    """``lowshot_knn_{n}shot`` and ``lowshot_linear_{n}shot`` for every n of ``settings.lowshot_n_per_class``.

    kNN uses the smallest k of ``settings.knn_ks`` (clipped to the subset size) and ``knn_temperature``; the
    probe uses its fixed low-shot l2 (see ``lowshot_linear_probe_accuracy``) and ``probe_max_iter``. Seeded by
    ``settings.seed``.
    """
    if not has_single_labels(query, "low-shot"):
        return {}
    n_per_class = tuple(int(n) for n in settings.lowshot_n_per_class)
    common = dict(n_per_class=n_per_class, n_tries=settings.lowshot_n_tries, seed=settings.seed)
    knn = lowshot_knn_accuracy(bank["embedding"], bank["label"], query["embedding"], query["label"],
                               k=min(settings.knn_ks), temperature=settings.knn_temperature, **common)
    linear = lowshot_linear_probe_accuracy(bank["embedding"], bank["label"], query["embedding"], query["label"],
                                           max_iter=settings.probe_max_iter, **common)
    result = {f"lowshot_knn_{n}shot": knn[n] for n in n_per_class}
    result.update({f"lowshot_linear_{n}shot": linear[n] for n in n_per_class})
    return result
