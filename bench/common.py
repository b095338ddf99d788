"""Shared pieces of the benchmarks: timing with warm-up, peak memory, seeded data, result lines and tables.

Every benchmark module exposes ``run(quick: bool, device: str) -> list[Result]``; ``run_all.py`` prints each
result as one line and, in full mode, writes the markdown tables of ``RESULTS.md``.
"""

from __future__ import annotations

import gc
import os
import platform
import re
import resource
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


# -- timing -----------------------------------------------------------------------------------------
def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    seconds: float  # the best of the timed repeats
    value: Any  # what the last call returned
    peak_mb: float  # the call's peak resident memory above the memory in use when it started
    device_peak_mb: float = 0.0  # CUDA: peak allocated during the call


def timed(fn: Callable[[], Any], device: str = "cpu", warmup: Callable[[], Any] | None = None,
          repeats: int = 1) -> Timing:
    """Run ``warmup`` (default: nothing) once, then ``fn`` ``repeats`` times; best wall time and peak memory.

    The warm-up is usually the same call on a small input: it loads libraries, spins up thread pools and
    caches kernels without doubling the cost of a minutes-long reference run.
    """
    if warmup is not None:
        warmup()
        synchronize(device)
    best, value, peak, device_peak = float("inf"), None, 0.0, 0.0
    for _ in range(repeats):
        gc.collect()
        is_cuda = torch.device(device).type == "cuda"
        if is_cuda:
            torch.cuda.reset_peak_memory_stats()
            device_base = torch.cuda.memory_allocated()
        with peak_rss() as memory:
            start = time.perf_counter()
            value = fn()
            synchronize(device)
            best = min(best, time.perf_counter() - start)
        peak = max(peak, memory.delta_mb)
        if is_cuda:
            device_peak = max(device_peak, (torch.cuda.max_memory_allocated() - device_base) / 2**20)
    return Timing(best, value, peak, device_peak)


def timed_pair(fn_a: Callable[[], Any], fn_b: Callable[[], Any], device: str = "cpu", repeats: int = 2,
               warmup: Callable[[], Any] | None = None) -> tuple[Timing, Timing]:
    """Time two calls alternately (a, b, a, b, ...), each keeping its best: a ratio of the two then suffers
    less from other work that comes and goes on a shared machine than two back-to-back blocks of runs."""
    if warmup is not None:
        warmup()
        synchronize(device)
    a_runs, b_runs = [], []
    for _ in range(repeats):
        a_runs.append(timed(fn_a, device))
        b_runs.append(timed(fn_b, device))
    return min(a_runs, key=lambda t: t.seconds), min(b_runs, key=lambda t: t.seconds)


# -- memory -----------------------------------------------------------------------------------------
def _status_mb(field_name: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"{field_name}:\s+(\d+) kB", text)
    return int(match.group(1)) / 1024 if match else None


def rss_mb() -> float:
    """Resident memory now (Linux), else the process's peak so far."""
    now = _status_mb("VmRSS")
    return now if now is not None else max_rss_mb()


def max_rss_mb() -> float:
    """Peak resident memory of this process so far (``getrusage``; kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _reset_peak() -> bool:
    """Reset the kernel's high-water mark (VmHWM) to the current RSS: Linux >= 4.0, writing 5 to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    base_mb: float = 0.0
    peak_mb: float = 0.0

    @property
    def delta_mb(self) -> float:
        return max(0.0, self.peak_mb - self.base_mb)


@contextmanager
def peak_rss():
    """Peak resident memory inside the block, and its excess over the memory in use at entry.

    Exact on Linux (the kernel's VmHWM, reset at entry); elsewhere ``getrusage``'s lifetime peak, which
    reads 0 extra whenever an earlier, larger allocation already set it.
    """
    memory = PeakMemory(base_mb=rss_mb())
    exact = _reset_peak()
    yield memory
    memory.peak_mb = (_status_mb("VmHWM") if exact else None) or max_rss_mb()


# -- data -------------------------------------------------------------------------------------------
def gaussian_mixture(n: int, dim: int, n_classes: int, spread: float = 1.0, seed: int = 0,
                     centers: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` float32 samples of ``n_classes`` isotropic Gaussians in ``dim`` dimensions, with known labels.

    Class centres are N(0, I / dim), of norm about 1 (pass ``centers`` to draw a second split of the same
    mixture); each sample is its centre plus N(0, spread^2 I / dim) noise, of norm about ``spread``. Two
    centres lie about sqrt(2) apart, so in high dimensions ``spread`` up to ~2 still gives well-separated
    classes (the noise is nearly orthogonal to the centre differences); larger values make them overlap. Labels are balanced (i mod n_classes) and shuffled.
    Returns ``(x (n, dim), labels (n,), centers (n_classes, dim))``.
    """
    generator = torch.Generator().manual_seed(seed)
    if centers is None:
        centers = torch.randn(n_classes, dim, generator=generator) / dim**0.5
    labels = torch.arange(n) % n_classes
    labels = labels[torch.randperm(n, generator=generator)]
    x = torch.randn(n, dim, generator=generator).mul_(spread / dim**0.5).add_(centers[labels])
    return x, labels, centers


# -- results ----------------------------------------------------------------------------------------
@dataclass
class Result:
    """One benchmark line. ``ratio`` is what ``target`` is stated in (a speed-up, a time fraction, ...)."""

    bench: str
    what: str
    ours_s: float
    ref_s: float
    ratio: float
    ratio_kind: str  # e.g. "speed-up", "x matmul", "overhead", "of pure forward"
    target: str
    met: bool | None  # None: no target for this line
    agreement: str
    agrees: bool
    peak_mb: dict[str, float] = field(default_factory=dict)  # name -> MB
    notes: str = ""

    def line(self) -> str:
        target = "" if self.met is None else f"  target {self.target}: {'MET' if self.met else 'MISSED'}"
        memory = ", ".join(f"{name} {mb:,.0f} MB" for name, mb in self.peak_mb.items())
        return (f"[{self.bench}] {self.what}: fmprobe {format_seconds(self.ours_s)}, reference "
                f"{format_seconds(self.ref_s)}, {self.ratio:.2f} {self.ratio_kind}{target} | agreement: "
                f"{self.agreement} ({'ok' if self.agrees else 'DISAGREES'}) | peak RSS: {memory or '-'}")


def count(n: int) -> str:
    """50000 -> '50k', 200 -> '200': sizes in result lines."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def format_seconds(seconds: float) -> str:
    if seconds != seconds:  # NaN: not measured
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def markdown_table(results: list[Result]) -> str:
    rows = ["| id | what | fmprobe | reference | ratio | target | met | agreement | peak RSS (MB above start) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        met = "—" if r.met is None else ("yes" if r.met else "**no**")
        memory = "; ".join(f"{name} {mb:,.0f}" for name, mb in r.peak_mb.items()) or "—"
        rows.append(f"| {r.bench} | {_cell(r.what)} | {format_seconds(r.ours_s)} | {format_seconds(r.ref_s)} | "
                    f"{r.ratio:.2f} {_cell(r.ratio_kind)} | {r.target} | {met} | {_cell(r.agreement)} | "
                    f"{_cell(memory)} |")
    return "\n".join(rows)


def load_average() -> float | None:
    """The 1-minute load average (None where the OS does not report it)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine_description(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0].strip() if names else cpu
    except OSError:
        pass
    parts = [f"{os.cpu_count()} cores ({cpu})", f"torch {torch.__version__} ({torch.get_num_threads()} threads)"]
    try:
        import sklearn

        parts.append(f"scikit-learn {sklearn.__version__}")
    except ImportError:
        pass
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        parts.append(f"device cuda: {torch.cuda.get_device_name()}")
    else:
        parts.append("device cpu")
    return ", ".join(parts)
