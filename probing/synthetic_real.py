"""Seed 000's report: generated images next to real ones of the same sub-classes, in one backbone's space.

Given a real dataset and a synthetic (generated) one whose class names overlap, per backbone (final
embedding, all splits of each dataset together):

1. **Sub-classes**: for every sub-class the two sets share, how far the synthetic samples lie from the real
   centroid of their own sub-class, relative to the real centroids of the other sub-classes
   (``subclass_distance_ratio`` < 1: closer to their own), how often the nearest real centroid is their own
   (``subclass_nearest_acc``), and the offset between the synthetic and real centroids relative to the real
   sub-class's own radius (``subclass_centroid_gap``).
2. **Super-classes** (both sets name super-classes): the same against real super-class centroids.
3. **Novel sub-classes** (synthetic sub-classes the real set lacks, under a super-class it has): where they land,
   by ``geometry.hierarchy.hierarchy_metrics`` on the real samples plus the novel ones (``hier_*``: e.g.
   ``hier_novel_super_acc``, ``hier_novel_dist_ratio``, ``hier_novel_tightness``), and whether their nearest real
   sub-class centroid belongs to their own super-class (``novel_nearest_superclass_acc``).

Distances are cosine distances (``geometry.common.distance_block`` on L2-normalised rows), as in kNN.
"""

from __future__ import annotations

from typing import Any

import torch

from geometry.common import distance_block, unit_rows
from probing.extract import FINAL_LAYER
from probing.report import row


def _names(datamodule, attribute: str) -> list[str]:
    return [str(n) for n in (getattr(datamodule, attribute, None) or [])]


def _pooled(splits: dict[str, dict], layer: str = FINAL_LAYER) -> dict[str, torch.Tensor]:
    """All splits of one dataset stacked (features, labels, super-classes where every split has them)."""
    parts = [split[layer] for split in splits.values()]
    out = {"embedding": torch.cat([p["embedding"].float() for p in parts]),
           "label": torch.cat([p["label"].long() for p in parts])}
    if all("superclass" in p for p in parts):
        out["superclass"] = torch.cat([p["superclass"].long() for p in parts])
    return out


def centroids(x: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """(len(classes), D) mean of the rows of each class (rows already L2-normalised)."""
    return torch.stack([x[labels == c].mean(0) for c in classes])


def _against_centroids(x: torch.Tensor, own: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Samples ``x`` whose true centroid row is ``own``: nearest-centroid accuracy and own / other distance ratio."""
    distances = distance_block(x, unit_rows(reference), "cosine")  # (n, n_centroids), small: n x classes
    same = distances.gather(1, own[:, None]).squeeze(1)
    other_mask = torch.ones_like(distances, dtype=torch.bool).scatter_(1, own[:, None], False)
    other = (distances * other_mask).sum(1) / other_mask.sum(1).clamp(min=1)
    return {"nearest_acc": (distances.argmin(1) == own).float().mean().item(),
            "distance_same": same.mean().item(), "distance_other": other.mean().item(),
            "distance_ratio": (same.mean() / other.mean().clamp(min=1e-12)).item()}


def compare(real: dict, synthetic: dict, real_names: list[str], synthetic_names: list[str],
            real_super: list[str], synthetic_super: list[str]) -> dict[str, Any]:
    """The numbers of one backbone; label ids are mapped across the two datasets by class name."""
    from geometry.hierarchy import hierarchy_metrics

    rx, sx = unit_rows(real["embedding"]), unit_rows(synthetic["embedding"])
    real_classes = sorted(set(real["label"].tolist()))
    position = {real_names[c]: i for i, c in enumerate(real_classes)}
    real_centroids = centroids(rx, real["label"], real_classes)
    synthetic_name = [synthetic_names[c] for c in synthetic["label"].tolist()]
    shared = torch.tensor([name in position for name in synthetic_name])
    out: dict[str, Any] = {"shared_classes": sorted({n for n in synthetic_name if n in position}),
                           "novel_classes": sorted({n for n in synthetic_name if n not in position})}
    metrics: dict[str, float] = {}
    per_class = []
    if shared.any():
        own = torch.tensor([position[n] for n, keep in zip(synthetic_name, shared.tolist()) if keep])
        result = _against_centroids(sx[shared], own, real_centroids)
        metrics.update({f"subclass_{k}": v for k, v in result.items()})
        gaps = []
        for name in out["shared_classes"]:
            i = position[name]
            mine = sx[shared][own == i]
            radius = distance_block(rx[real["label"] == real_classes[i]], real_centroids[i:i + 1], "cosine").mean()
            gap = distance_block(mine.mean(0, keepdim=True), real_centroids[i:i + 1], "cosine").item()
            gaps.append(gap / max(radius.item(), 1e-12))
            detail = _against_centroids(mine, torch.full((len(mine),), i), real_centroids)
            per_class.append({"class": name, "n_synthetic": len(mine), "centroid_gap_vs_radius": gaps[-1], **detail})
        metrics["subclass_centroid_gap"] = sum(gaps) / len(gaps)
    has_super = "superclass" in real and "superclass" in synthetic and real_super and synthetic_super
    if has_super:
        super_of_sample = [synthetic_super[s] for s in synthetic["superclass"].tolist()]
        real_supers = sorted(set(real["superclass"].tolist()))
        super_position = {real_super[s]: i for i, s in enumerate(real_supers)}
        known = torch.tensor([name in super_position for name in super_of_sample])
        if known.any():
            own = torch.tensor([super_position[n] for n, keep in zip(super_of_sample, known.tolist()) if keep])
            # As in geometry.hierarchy: a super-class centroid is the mean of its sub-class centroids.
            super_of_class = [int(real["superclass"][real["label"] == c][0]) for c in real_classes]
            super_centroids = torch.stack([
                real_centroids[[i for i, s in enumerate(super_of_class) if s == sup]].mean(0) for sup in real_supers])
            result = _against_centroids(sx[known], own, super_centroids)
            metrics.update({f"superclass_{k}": v for k, v in result.items()})
        novel = (~shared) & known
        if novel.any():
            values, out["novel"] = _novel(rx, real, sx[novel], novel, synthetic, real_names, real_super,
                                          synthetic_names, synthetic_super, real_classes, real_centroids,
                                          hierarchy_metrics)
            metrics.update(values)
    out["metrics"], out["per_class"] = metrics, per_class
    return out


def _novel(rx, real, novel_x, novel, synthetic, real_names, real_super, synthetic_names, synthetic_super,
           real_classes, real_centroids, hierarchy_metrics) -> tuple[dict[str, float], list[dict]]:
    """Novel synthetic sub-classes among the real data: ``hierarchy_metrics`` plus nearest-centroid super-class."""
    names = list(dict.fromkeys([real_names[c] for c in real_classes] +
                               [synthetic_names[c] for c in synthetic["label"][novel].tolist()]))
    supers = list(dict.fromkeys(real_super[s] for s in real["superclass"].tolist()))
    sub = torch.tensor([names.index(real_names[c]) for c in real["label"].tolist()] +
                       [names.index(synthetic_names[c]) for c in synthetic["label"][novel].tolist()])
    sup = torch.tensor([supers.index(real_super[s]) for s in real["superclass"].tolist()] +
                       [supers.index(synthetic_super[s]) for s in synthetic["superclass"][novel].tolist()])
    mask = torch.cat([torch.zeros(len(rx), dtype=torch.bool), torch.ones(len(novel_x), dtype=torch.bool)])
    values = {f"hier_{k}": float(v) for k, v in hierarchy_metrics(torch.cat([rx, novel_x]), sub, sup,
                                                                    novel_mask=mask).items()}
    super_of_real_class = {}
    for c, s in zip(real["label"].tolist(), real["superclass"].tolist()):
        super_of_real_class.setdefault(c, real_super[s])
    nearest = distance_block(novel_x, unit_rows(real_centroids), "cosine").argmin(1)
    own_super = [synthetic_super[s] for s in synthetic["superclass"][novel].tolist()]
    landed = [super_of_real_class[real_classes[j]] for j in nearest.tolist()]
    values["novel_nearest_superclass_acc"] = sum(a == b for a, b in zip(landed, own_super)) / len(landed)
    details = []
    novel_names = [synthetic_names[c] for c in synthetic["label"][novel].tolist()]
    for name in dict.fromkeys(novel_names):
        mine = [i for i, n in enumerate(novel_names) if n == name]
        nearest_names = [real_names[real_classes[nearest[i]]] for i in mine]
        details.append({"class": name, "superclass": own_super[mine[0]], "n": len(mine),
                        "nearest_real_subclass": max(set(nearest_names), key=nearest_names.count),
                        "lands_in_own_superclass": sum(landed[i] == own_super[i] for i in mine) / len(mine)})
    return values, details


def synthetic_vs_real(features: dict, modules: dict, real: str, synthetic: str) -> tuple[list[dict], dict, Any]:
    """Rows (dataset ``<synthetic>~<real>``), the results.json section and a Rich table of one pair."""
    from rich.table import Table

    label = f"{synthetic}~{real}"
    rows, per_backbone = [], {}
    for backbone, per_dataset in features.items():
        if real not in per_dataset or synthetic not in per_dataset:
            continue
        result = compare(_pooled(per_dataset[real]), _pooled(per_dataset[synthetic]),
                         _names(modules[real], "class_names"), _names(modules[synthetic], "class_names"),
                         _names(modules[real], "superclass_names"), _names(modules[synthetic], "superclass_names"))
        per_backbone[backbone] = result
        rows += [row(backbone, label, FINAL_LAYER, f"synth_{name}", value)
                 for name, value in result["metrics"].items()]
    table = Table(title=f"synthetic vs real: {synthetic} against {real}", header_style="bold")
    table.add_column("metric")
    for backbone in per_backbone:
        table.add_column(backbone, justify="right")
    names = list(dict.fromkeys(k for r in per_backbone.values() for k in r["metrics"]))
    for name in names:
        table.add_row(name, *(f"{r['metrics'].get(name, float('nan')):.4f}" for r in per_backbone.values()))
    return rows, {"real": real, "synthetic": synthetic, "dataset": label, "backbones": per_backbone}, table
