"""fmprobe's frozen-feature probing: backbones x datasets -> cached features -> metrics table, CSV/JSON, plots.

    python probe.py --config configs/probe_quickstart.yaml
    python probe.py --backbones '[dinov2-small, clip-vit-b32]' --datasets '[cifar10, medmnist-path]' \\
        --metrics '[knn, kmeans, linear, cka, fewshot]'
    python probe.py --config configs/probe_quickstart.yaml --layers all --devices 2 --strategy ddp

With a frozen backbone, running it again for every probe is waste: features are extracted once (through
Lightning, on any number of devices) into an on-disk cache and every metric is computed from them by
``geometry/``. Everything lands in ``<runs_dir>/probe-<name>/``: ``results.csv`` / ``results.json`` (long
format: backbone, dataset, layer, metric, value), ``config.yaml`` and ``plots/*.png``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

if __name__ == "__main__":  # a missing environment or a broken config file is reported before heavy imports
    from cli.errors import run_preflight

    run_preflight(sys.argv[1:], requires=("lightning", "yaml", "jsonargparse"))

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser  # noqa: E402

from cli.errors import OneLineParserErrors  # noqa: E402
from geometry.suite import DEFAULT_METRICS, MetricSettings  # noqa: E402

log = logging.getLogger("fmprobe.probe")

#: Spellings of the issue (``--no-cache``) accepted next to jsonargparse's (``--no_cache``).
ARG_ALIASES = {"--no-cache": "--no_cache", "--rebuild-cache": "--rebuild_cache"}


class Parser(OneLineParserErrors, ArgumentParser):
    """probe.py's options; a bad one is reported as one ``error:`` line."""


def build_parser() -> ArgumentParser:
    parser = Parser(prog="probe.py", description=__doc__.split("\n\n")[0], default_env=False)
    add = parser.add_argument
    add("--config", action=ActionConfigFile, help="A YAML file with any of these options (later flags override it).")
    add("--name", type=str | None, default=None,
        help="Run name: outputs go to <runs_dir>/probe-<name>/ (default: the start time).")
    add("--runs_dir", type=str, default="runs", help="Folder holding the run directories.")
    add("--backbones", type=list[str | dict], default=["efficientnet-lite0"],
        help="Backbones to probe: registry / timm / transformers names, 'name@random' or 'name@/path/to/weights' "
             "for other weights, or dicts {name, weights, image_size, overrides, label}.")
    add("--image_size", type=int | None, default=None,
        help="Input side in pixels for every backbone without its own image_size (default: each backbone's own).")
    add("--datasets", type=list[str | dict], default=["digits"],
        help="Datasets: digits, synthetic, cifar10, cifar100, medmnist-<flag> (e.g. medmnist-path), folder:<path>, "
             "or dicts {name, init_args} / {class_path, init_args, label}.")
    add("--data_root", type=str | None, default=None,
        help="Passed as 'root' to DataModules that take one and were given none (e.g. where CIFAR files live).")
    add("--download", type=bool, default=False,
        help="Let DataModules that can download (CIFAR, MedMNIST) fetch missing files (needs the network).")
    add("--metrics", type=list[str], default=[*DEFAULT_METRICS, "fewshot", "cka"],
        help="Metrics of the final embedding: suite metrics (knn, kmeans, linear, fewshot, hierarchy (data with "
             "super-classes), ..., or a dotted path package.module.function naming your own) and cka (between "
             "backbones on each dataset, and between layers with --layers).")
    add("--layers", type=str | list[int], default="final",
        help="'final' (the backbone's embedding only), 'all' (every block too: metric vs depth), or a list of "
             "block indices (negative counts from the end).")
    add("--layer_metrics", type=list[str] | None, default=None,
        help="Metrics computed on the blocks in layer-wise mode (default: --metrics; the linear probe is the slow one).")
    add("--query_split", type=str, default="auto",
        help="Where metrics are scored: 'auto' (GeometryEval's rule: the val split when the dataset has one, else "
             "test; datasets get val_fraction 0 unless their init_args set one, so the whole train split is the "
             "bank), 'test' or 'val' (val_fraction 0.1 unless set).")
    add("--query_shifts", type=list[str] | None, default=None,
        help="ImageNet-C corruptions of the queries (the bank stays clean), e.g. '[gaussian_noise:3, contrast:1-5]' "
             "(a range gives every severity): every metric of the final embedding per shift, as rows of dataset "
             "'<dataset>+<corruption>:<severity>', and plots/shift_<dataset>.png of metric vs severity. Corruptions: "
             "gaussian_noise, shot_noise, impulse_noise, gaussian_blur, contrast, brightness, pixelate, jpeg "
             "(datamodules/corruptions.py).")
    add("--max_bank_size", type=int | None, default=None, help="Use at most this many train samples (seeded).")
    add("--max_query_size", type=int | None, default=None, help="Use at most this many query samples (seeded).")
    add("--batch_size", type=int, default=64, help="Images per batch and device during extraction.")
    add("--num_workers", type=int | None, default=None, help="DataLoader workers (default: min(4, CPUs - 1)).")
    add("--settings", type=MetricSettings, default=MetricSettings(),
        help="Evaluation settings (geometry.suite.MetricSettings): --settings.knn_ks, --settings.knn_temperature, "
             "--settings.kmeans_n_init, --settings.seed (subsets, random weights, k-means, probes), ...")
    add("--cka_debiased", type=bool, default=False, help="Use the debiased linear CKA estimator.")
    add("--similarities", type=list[str] | None, default=None,
        help="Calibrated similarity matrices of the query features, backbone x backbone and (with --layers) layer x "
             "layer: any of linear_cka, mutual_knn, cknna, procrustes, rsa, svcca, pwcca; each score with its "
             "permutation-calibrated value and p-value (--settings.calibration_permutations, default 200).")
    add("--compare", type=list[list[str]] | None, default=None,
        help="Paired comparisons on the same queries: pairs [[a, b], ...] of backbone labels (or [[all]]: each "
             "against the first): per accuracy the difference a - b, its paired bootstrap interval and the exact "
             "McNemar p-value (rows <metric>_diff, _diff_ci_low, _diff_ci_high, _mcnemar_p, against = b).")
    add("--synthetic_vs_real", type=list[dict[str, str]] | None, default=None,
        help="Pairs {real: <dataset>, synthetic: <dataset>} of datasets whose class names overlap: how far the "
             "synthetic embeddings of each sub-class lie from the real ones, and where novel sub-classes land.")
    add("--embedding_map", type=str, default="auto",
        help="2-D embedding maps: 'pca', 'umap' (needs umap-learn), 'auto' (UMAP when installed) or 'none'.")
    add("--plots", action=ActionYesNo, default=True, help="Draw the PNG figures (--no_plots: tables and files only).")
    add("--cache", action=ActionYesNo, default=True, help="Use the feature cache (--no_cache: neither read nor write).")
    add("--rebuild_cache", action=ActionYesNo(no_prefix=None), default=False,
        help="Ignore cached features: extract again and overwrite the entries.")
    add("--cache_dir", type=str | None, default=None,
        help="Feature cache folder (default: $FMPROBE_CACHE_DIR or ~/.cache/fmprobe/features).")
    add("--feature_dtype", type=str, default="float32", help="Storage of features: float32 or float16.")
    add("--accelerator", type=str, default="auto", help="Lightning accelerator: auto, cpu, gpu, ...")
    add("--devices", type=int | str, default=1, help="Devices for extraction (e.g. 2 with --strategy ddp).")
    add("--strategy", type=str, default="auto", help="Lightning strategy for extraction (e.g. ddp).")
    add("--num_nodes", type=int, default=1, help="Nodes for multi-node extraction.")
    add("--shard_metrics", type=bool | None, default=None,
        help="With several processes: each keeps only its own rows of every feature set (its own cache entries) "
             "and the metrics are computed across processes, so none holds a whole bank; false: gather everything, "
             "rank 0 computes (default: on when more than one process extracts).")
    add("--precision", type=str, default="32",
        help="Autocast of the forward pass: 32, bf16 or fp16 (also Lightning's bf16-mixed / 16-mixed; meant for "
             "GPUs); part of the cache key.")
    add("--progress", action=ActionYesNo, default=True, help="Show progress bars.")
    return parser


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Parse the options and run the probe (``probing.run.run_probe``); returns its result dict."""
    from cli.errors import setup_phase

    with setup_phase():
        parser = build_parser()
        argv = [ARG_ALIASES.get(a, a) for a in (sys.argv[1:] if args is None else args)]
        cfg = parser.parse_args(argv)
        config_text = parser.dump(cfg)
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
        settings = instantiate(cfg).settings
    from cli.startup import import_lightning

    import_lightning()  # without the two eager imports of torchmetrics that no code path here uses
    from probing.run import run_probe

    return run_probe(cfg, settings, config_text)


if __name__ == "__main__":
    from cli.errors import run
    from cli.memory import keep_freed_memory

    # As a command only (each DDP rank runs this file too): a test or notebook calling main() keeps its allocator.
    keep_freed_memory()  # large blocks reuse freed pages instead of faulting in fresh ones (cli/memory.py)
    run(main)  # errors as one line (--debug or FMPROBE_DEBUG=1: with the traceback)
