"""What ``ContinualEval`` records besides the accuracy matrices, kept apart because it needs no trainer.

* ``StabilityCurves``: accuracy measured *within* experiences (the stability gap, De Lange et al. 2023): per kind
  of accuracy (``head``, ``knn``) and per experience j, the points ``(step, accuracy)``, plus the step at which
  each experience's training ended; summarised by ``geometry.continual.stability_metrics`` (min-ACC, WC-ACC).
* ``ResourceMeter``: wall time and peak memory of one experience. On CUDA the peak is
  ``torch.cuda.max_memory_allocated`` since the experience began (the statistics are reset at its start): the
  tensors' high-water mark. On CPU it is the process's resident-set high-water mark ``ru_maxrss`` (Linux: KiB),
  reported as its value at the end of the experience and its growth during it; ``ru_maxrss`` never goes down,
  so an experience that needs less than an earlier one shows a growth of 0 (tracemalloc would miss torch's
  allocations, which do not go through Python's allocator).
"""

from __future__ import annotations

import math
import time

import torch

from geometry.continual import stability_metrics

KINDS = ("head", "knn")


class StabilityCurves:
    """Accuracy curves within experiences and the experience boundaries; a dict-of-lists state for checkpoints."""

    def __init__(self) -> None:
        self.curves: dict[str, dict[int, list[list[float]]]] = {kind: {} for kind in KINDS}
        self.ends: dict[int, int] = {}  # experience -> global step at which its training ended

    def has(self, kind: str, experience: int, step: int) -> bool:
        return any(point[0] == step for point in self.curves[kind].get(experience, ()))

    def add(self, kind: str, experience: int, step: int, accuracy: float) -> None:
        if not self.has(kind, experience, step):
            self.curves[kind].setdefault(experience, []).append([int(step), float(accuracy)])
            self.curves[kind][experience].sort(key=lambda point: point[0])

    def end(self, experience: int, step: int) -> None:
        self.ends[experience] = int(step)

    def metrics(self, kind: str) -> dict[str, float]:
        """min-ACC / WC-ACC at the end of the last experience closed so far (every earlier one closed too)."""
        done = 0
        while done in self.ends:
            done += 1
        curves = [self.curves[kind].get(j, []) for j in range(done)]
        if done == 0 or not curves[-1]:
            return {}
        ends = [self.ends[j] for j in range(done)]
        if any(b <= a for a, b in zip(ends, ends[1:])):
            return {}  # an experience of zero steps (a fit cut short): no gap to measure
        return stability_metrics(curves, ends)

    def section(self) -> dict:
        return {"ends": [self.ends[j] for j in sorted(self.ends)],
                **{kind: {"curves": {str(j): points for j, points in sorted(self.curves[kind].items())},
                          **self.metrics(kind)} for kind in KINDS if self.curves[kind]}}

    def state_dict(self) -> dict:
        return {"curves": self.curves, "ends": self.ends}

    def load_state_dict(self, state: dict) -> None:
        self.curves = {kind: {int(j): [list(p) for p in points] for j, points in state["curves"].get(kind, {}).items()}
                       for kind in KINDS}
        self.ends = {int(j): int(step) for j, step in state["ends"].items()}


class ResourceMeter:
    """Wall time and peak memory from ``start`` to ``stop`` (see the module docstring for what 'peak' is)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.rss_start = 0
        self.device: torch.device | None = None

    @staticmethod
    def _max_rss_bytes() -> int:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB

    def start(self, device: torch.device) -> None:
        self.device, self.started = torch.device(device), time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_start = self._max_rss_bytes()

    def stop(self) -> dict:
        if self.started is None:
            return {"seconds": math.nan}
        out = {"seconds": time.perf_counter() - self.started}
        rss = self._max_rss_bytes()
        out.update(peak_rss_bytes=rss, peak_rss_growth_bytes=rss - self.rss_start)
        if self.device.type == "cuda":
            out["peak_cuda_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        self.started = None
        return out
