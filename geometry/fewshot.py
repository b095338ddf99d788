"""Few-shot evaluation: N-way K-shot episodes classified by the nearest class centroid (prototype).

Each episode draws ``n_way`` classes and, per class, ``n_shot`` support and ``n_query`` query samples
without overlap. Queries go to the nearest prototype (mean of the support features): by cosine similarity
of L2-normalised features (``metric="cosine"``, the default) or by Euclidean distance on raw features.
All episodes are sampled and scored as batched tensors (chunks of episodes), not in a Python loop.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from geometry.common import as_features, as_labels, check_distance, has_single_labels, unit_rows

_EPISODE_ELEMENTS = 1 << 24  # memory budget of one chunk of episodes (random keys or gathered features)


def sample_episodes(labels, n_way: int, n_shot: int, n_query: int, episodes: int,
                    generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Sample indices: support (episodes, n_way, n_shot) and query (episodes, n_way, n_query).

    Only classes with at least ``n_shot + n_query`` samples take part. Uses ``generator`` (CPU) only, so
    episodes are reproducible from its seed.
    """
    labels = torch.as_tensor(labels).cpu()
    labels = as_labels(labels, labels.shape[0])
    per_way = n_shot + n_query
    _, cls, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    eligible = (counts >= per_way).nonzero().flatten()
    if len(eligible) < n_way:
        raise ValueError(f"{n_way}-way {n_shot}-shot episodes with {n_query} queries need {n_way} classes with at "
                         f"least {per_way} samples; only {len(eligible)} classes have that many")
    # Members of each eligible class as rows of a padded table; random keys of padding are pushed past 1.
    order = torch.argsort(cls, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    max_count = int(counts[eligible].max())
    slot = torch.arange(max_count)
    table = order[(starts[eligible].unsqueeze(1) + slot).clamp(max=len(labels) - 1)]
    padding = slot.unsqueeze(0) >= counts[eligible].unsqueeze(1)

    chosen = []
    step = max(1, _EPISODE_ELEMENTS // (n_way * max_count))
    for start in range(0, episodes, step):
        e = min(step, episodes - start)
        ways = torch.rand(e, len(eligible), generator=generator).argsort(dim=1)[:, :n_way]
        keys = torch.rand(e, n_way, max_count, generator=generator).masked_fill_(padding[ways], 2.0)
        picks = keys.topk(per_way, dim=2, largest=False, sorted=True).indices
        chosen.append(table[ways.unsqueeze(2), picks])
    chosen = torch.cat(chosen)
    return chosen[..., :n_shot], chosen[..., n_shot:]


def episode_accuracies(x, support: Tensor, query: Tensor, metric: str = "cosine") -> Tensor:
    """Accuracy of each episode (E,) given sample indices from ``sample_episodes``; ties go to the lower way."""
    check_distance(metric)
    x = as_features(x)
    features = unit_rows(x) if metric == "cosine" else x
    n_episodes, n_way, n_query = query.shape
    truth = torch.arange(n_way, device=x.device).repeat_interleave(n_query)
    step = max(1, _EPISODE_ELEMENTS // (n_way * (support.shape[2] + n_query) * x.shape[1]))
    accuracies = []
    for start in range(0, n_episodes, step):
        s_idx, q_idx = support[start : start + step].to(x.device), query[start : start + step].to(x.device)
        prototypes = features[s_idx].mean(dim=2)  # (e, way, D)
        queries = features[q_idx].flatten(1, 2)  # (e, way * query, D)
        if metric == "cosine":
            score = queries @ unit_rows(prototypes.flatten(0, 1)).view_as(prototypes).transpose(1, 2)
        else:
            score = -torch.cdist(queries, prototypes)
        accuracies.append((score.argmax(dim=2) == truth).float().mean(dim=1))
    return torch.cat(accuracies)


def fewshot_accuracy(x, y, n_way: int = 5, shots: Sequence[int] = (1, 10), n_query: int = 15, episodes: int = 600,
                     seed: int = 0, metric: str = "cosine") -> dict[int, tuple[float, float]]:
    """``{n_shot: (mean accuracy, 95% CI half-width)}`` over ``episodes`` N-way K-shot episodes.

    CI = 1.96 x std / sqrt(episodes), std over episode accuracies with ddof=0 (as np.std). Episodes of the
    shots are drawn in sorted order from one generator seeded with ``seed``.
    """
    x = as_features(x)
    y = as_labels(y, x.shape[0])
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for n_shot in sorted({int(s) for s in shots}):
        support, query = sample_episodes(y, n_way, n_shot, n_query, episodes, generator)
        accuracies = episode_accuracies(x, support, query, metric).double()
        std = accuracies.std(correction=0) if episodes > 1 else torch.zeros((), dtype=torch.float64)
        result[n_shot] = (float(accuracies.mean()), float(1.96 * std / episodes**0.5))
    return result


def fewshot_metrics(bank, query, settings) -> dict[str, float]:
    """Suite metric ``fewshot``: ``fewshot_{K}shot_acc`` and its ``_ci95`` on episodes drawn from the queries.

    Shot counts the queries cannot feed (fewer than ``fewshot_ways`` classes with shots + queries samples) are
    skipped with a warning.
    """
    if not has_single_labels(query, "few-shot"):
        return {}
    x, y = query["embedding"].float(), query["label"]
    per_class = torch.unique(y, return_counts=True)[1]
    shots = tuple(s for s in settings.fewshot_shots
                  if int((per_class >= s + settings.fewshot_queries).sum()) >= settings.fewshot_ways)
    missing = sorted(set(settings.fewshot_shots) - set(shots))
    if missing:
        warnings.warn(f"few-shot: too few query samples per class for {', '.join(f'{s}-shot' for s in missing)} "
                      f"{settings.fewshot_ways}-way episodes with {settings.fewshot_queries} queries; skipped",
                      stacklevel=2)
    if not shots:
        return {}
    accuracy = fewshot_accuracy(x, y, n_way=settings.fewshot_ways, shots=shots, n_query=settings.fewshot_queries,
                                episodes=settings.fewshot_episodes, seed=settings.seed)
    out = {}
    for n_shot, (mean, ci) in accuracy.items():
        out[f"fewshot_{n_shot}shot_acc"], out[f"fewshot_{n_shot}shot_ci95"] = mean, ci
    return out
