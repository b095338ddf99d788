"""Per-class and per-label numbers of the kNN and the linear probe, for ``results.json`` beside the suite's flat dict.

Kept apart from ``geometry.classification`` (the metrics of predictions), which ``knn`` and ``linear_probe`` import.
"""

from __future__ import annotations

import torch

from geometry.classification import per_class_accuracy, per_label_auc
from geometry.knn import knn_multilabel_scores, knn_predict
from geometry.linear_probe import linear_probe, multilabel_linear_probe


def per_class_results(bank, query, settings, probe: bool = True) -> dict[str, dict[str, float]]:
    """Per-class numbers of the kNN and the linear probe for ``results.json``, beside the suite's flat dict.

    Single-label data: ``{"knn@{k}": {class: recall}}`` for every k of ``settings.knn_ks`` the bank can feed and
    ``{"linear_probe": {class: recall}}``. Multi-label data: ``knn_auc@{k}`` / ``knn_acc@{k}`` and
    ``linear_probe_auc`` / ``linear_probe_acc``, each ``{label: value}`` (labels without an AUC are left out).
    Inner keys are strings (JSON object keys). ``probe=False`` leaves out the probe, which costs one more fit.
    Same settings, seeds and therefore predictions as the ``knn`` and ``linear`` suite metrics.
    """
    bank_x, query_x, query_y = bank["embedding"].float(), query["embedding"].float(), query["label"]
    ks = tuple(k for k in settings.knn_ks if k <= len(bank_x))
    out: dict[str, dict[str, float]] = {}
    if query_y.ndim > 1:
        scores = knn_multilabel_scores(bank_x, bank["label"], query_x, ks=ks, temperature=settings.knn_temperature)
        for k in ks:
            out[f"knn_auc@{k}"] = _defined(per_label_auc(scores[k], query_y))
            out[f"knn_acc@{k}"] = _label_accuracy(scores[k] > 0.5, query_y)
        if probe:
            fit = multilabel_linear_probe(bank_x, bank["label"], query_x, query_y, l2_grid=settings.probe_l2_grid,
                                          seed=settings.seed)
            out["linear_probe_auc"] = _defined(per_label_auc(fit["scores"], query_y))
            out["linear_probe_acc"] = _label_accuracy(fit["predictions"], query_y)
        return out
    if ks:
        for k, predicted in knn_predict(bank_x, bank["label"], query_x, ks=ks,
                                        temperature=settings.knn_temperature).items():
            out[f"knn@{k}"] = {str(c): v for c, v in per_class_accuracy(predicted, query_y).items()}
    if probe:
        fit = linear_probe(bank_x, bank["label"], query_x, query_y, l2_grid=settings.probe_l2_grid,
                           seed=settings.seed, return_probabilities=True)
        out["linear_probe"] = {str(c): v for c, v in per_class_accuracy(fit["predictions"], query_y).items()}
    return out


def _defined(values: list[float]) -> dict[str, float]:
    return {str(i): v for i, v in enumerate(values) if v == v}


def _label_accuracy(pred, y) -> dict[str, float]:
    per_label = (torch.as_tensor(pred).long().to(y.device) == y.long()).double().mean(dim=0)
    return {str(i): float(v) for i, v in enumerate(per_label)}
