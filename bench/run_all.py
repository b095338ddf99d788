"""Run fmprobe's benchmarks against the reference implementations; full runs rewrite bench/RESULTS.md.

    python bench/run_all.py                      # full sizes, CPU; rewrites the CPU section of RESULTS.md
    python bench/run_all.py --device cuda        # the same on a GPU; rewrites the GPU section
    python bench/run_all.py --quick              # CI sizes: asserts that the answers agree (not the speed)
    python bench/run_all.py --only knn,kmeans    # a subset (full mode keeps the other rows of the table)

Each benchmark runs fmprobe and its reference in one process on the same data and prints one line per
comparison: both times, the ratio, whether the answers agree, and the peak resident memory of each call.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("knn", "kmeans", "logreg", "cka", "cache", "cache_io", "callback", "extract", "bootstrap", "quality",
              "sharded", "startup")
RESULTS_PATH = ROOT / "bench" / "RESULTS.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Small sizes; assert agreement; leave RESULTS.md alone.")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="Where fmprobe runs.")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"Comma-separated subset of {', '.join(BENCHMARKS)}.")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH, help="The markdown file a full run rewrites.")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {', '.join(BENCHMARKS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TQDM_DISABLE", "1")  # torch-cka's progress bars
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    import torch

    from bench.common import load_average, machine_description
    from bench.results_file import update_results

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    print(f"fmprobe benchmarks ({'quick' if args.quick else 'full'}), {machine_description(args.device)}",
          flush=True)
    results, failures, loads = [], [], {}
    started = time.perf_counter()
    for name in [b for b in BENCHMARKS if b in args.only]:
        module = importlib.import_module(f"bench.bench_{name}")
        bench_started = time.perf_counter()
        load_before = load_average()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence and Lightning chatter; the line says what matters
                lines = module.run(quick=args.quick, device=args.device)
        except Exception:  # noqa: BLE001 -- a full run records the failure and goes on with the others
            if args.quick:
                raise
            traceback.print_exc()
            failures.append(f"{name}: crashed")
            continue
        for result in lines:
            print(result.line(), flush=True)
            if not result.agrees:
                failures.append(f"{name}: {result.what}: answers disagree ({result.agreement})")
        loads[name] = (load_before, load_average())
        print(f"[{name}] done in {time.perf_counter() - bench_started:.1f} s (1-min load "
              f"{' -> '.join(f'{load:.1f}' for load in loads[name] if load is not None)})", flush=True)
        results += lines
    print(f"all done in {time.perf_counter() - started:.1f} s")
    if not args.quick:
        update_results(args.results, args.device, results, [b for b in BENCHMARKS if b in args.only],
                       list(BENCHMARKS), loads)
        print(f"wrote {args.results}")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
