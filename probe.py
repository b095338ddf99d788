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
import time
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

log = logging.getLogger("fmprobe.probe")

#: Spellings of the issue (``--no-cache``) accepted next to jsonargparse's (``--no_cache``).
ARG_ALIASES = {"--no-cache": "--no_cache", "--rebuild-cache": "--rebuild_cache"}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="probe.py", description=__doc__.split("\n\n")[0], default_env=False)
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
    add("--metrics", type=list[str], default=["knn", "kmeans", "linear", "fewshot", "hierarchy", "cka"],
        help="Metrics of the final embedding: knn, kmeans, linear, fewshot, hierarchy (data with super-classes), "
             "cka (between backbones on each dataset, and between layers with --layers).")
    add("--layers", type=str | list[int], default="final",
        help="'final' (the backbone's embedding only), 'all' (every block too: metric vs depth), or a list of "
             "block indices (negative counts from the end).")
    add("--layer_metrics", type=list[str] | None, default=None,
        help="Metrics computed on the blocks in layer-wise mode (default: --metrics; the linear probe is the slow one).")
    add("--query_split", type=str, default="test",
        help="Where metrics are scored: 'test' (the whole train split is the bank) or 'val'.")
    add("--max_bank_size", type=int | None, default=None, help="Use at most this many train samples (seeded).")
    add("--max_query_size", type=int | None, default=None, help="Use at most this many query samples (seeded).")
    add("--batch_size", type=int, default=64, help="Images per batch and device during extraction.")
    add("--num_workers", type=int | None, default=None, help="DataLoader workers (default: min(4, CPUs - 1)).")
    add("--knn_ks", type=list[int], default=[10, 20, 100, 200],
        help="k values of the weighted kNN (DINO's protocol), all from one retrieval.")
    add("--knn_temperature", type=float, default=0.07, help="Temperature T of the kNN vote weights exp(sim / T).")
    add("--kmeans_n_init", type=int, default=3, help="k-means restarts (the lowest inertia wins).")
    add("--cka_debiased", type=bool, default=False, help="Use the debiased linear CKA estimator.")
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
    add("--precision", type=str, default="32",
        help="Autocast of the forward pass: 32, bf16 or fp16 (also Lightning's bf16-mixed / 16-mixed; meant for "
             "GPUs); part of the cache key.")
    add("--seed", type=int, default=0, help="Seed of subsets, random backbone weights, k-means and the probes.")
    add("--progress", action=ActionYesNo, default=True, help="Show progress bars.")
    return parser


def resolve_blocks(layers: str | list[int], num_layers: int, backbone: str) -> list[int]:
    """Block indices wanted besides the final embedding."""
    if layers == "final":
        return []
    if layers == "all":
        return list(range(num_layers))
    if isinstance(layers, str):
        raise ValueError(f"--layers must be 'final', 'all' or a list of block indices, got {layers!r}")
    blocks = []
    for index in layers:
        if not -num_layers <= index < num_layers:
            raise ValueError(f"--layers: block {index} does not exist in {backbone} ({num_layers} blocks)")
        blocks.append(index % num_layers)
    return sorted(set(blocks))


def split_datasets(datamodule, query_split: str) -> dict[str, Any]:
    """The splits a probe reads: train (the bank), the query split, and novel sub-classes where they exist."""
    if query_split == "val":
        query = datamodule.val_dataset()
        if len(query) == 0:
            raise ValueError(f"{type(datamodule).__name__} has no validation samples; use --query_split test")
    else:
        query = datamodule.test_dataset()
    splits = {"train": datamodule.bank_dataset(), query_split: query}
    if hasattr(datamodule, "novel_dataset"):
        novel = datamodule.novel_dataset()
        if len(novel):
            splits["novel"] = novel
    return splits


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Run a probe; returns ``{"run_dir", "rows", "plots", "cache", "extraction_calls"}`` (empty on ranks > 0)."""
    from lightning.pytorch.utilities import rank_zero_only

    from callbacks.results import versions
    from probing.cache import FeatureCache
    from probing.evaluate import check_metrics, evaluate
    from probing.extract import ExtractionRunner, FeatureCollector, normalise_precision
    from probing.specs import parse_backbone, parse_dataset, unique_labels

    started = time.time()
    parser = build_parser()
    argv = [ARG_ALIASES.get(a, a) for a in (sys.argv[1:] if args is None else args)]
    cfg = parser.parse_args(argv)
    metrics = check_metrics(cfg.metrics)
    block_metrics = check_metrics(cfg.layer_metrics if cfg.layer_metrics is not None else cfg.metrics,
                                  "layer_metrics")
    if cfg.query_split not in ("test", "val"):
        raise ValueError(f"--query_split must be 'test' or 'val', got {cfg.query_split!r}")
    if cfg.embedding_map not in ("auto", "pca", "umap", "none"):
        raise ValueError(f"--embedding_map must be auto, pca, umap or none, got {cfg.embedding_map!r}")
    backbones = [parse_backbone(entry, cfg.image_size) for entry in cfg.backbones]
    datasets = [parse_dataset(entry) for entry in cfg.datasets]
    unique_labels([b.id for b in backbones], "backbones")
    unique_labels([d.label for d in datasets], "datasets")
    for dataset in datasets:
        dataset.datamodule_class()  # a missing dataset module fails now, before any extraction
    pairs = check_pairs(cfg.synthetic_vs_real, [d.label for d in datasets])
    cfg.precision = normalise_precision(cfg.precision)

    is_rank_zero = rank_zero_only.rank == 0
    run_dir = Path(cfg.runs_dir) / f"probe-{cfg.name or time.strftime('%Y%m%d-%H%M%S')}"
    config = {k: v for k, v in cfg.as_dict().items() if k != "config"}
    if is_rank_zero:
        from report.io import atomic_write_text

        atomic_write_text(run_dir / "config.yaml", parser.dump(cfg))

    cache = FeatureCache(cfg.cache_dir, enabled=cfg.cache, rebuild=cfg.rebuild_cache, writable=is_rank_zero)
    runner = ExtractionRunner(cfg.accelerator, cfg.devices, cfg.strategy, cfg.num_nodes, cfg.precision,
                              cfg.feature_dtype, cfg.progress)
    collector = FeatureCollector(runner, cache, {"train": cfg.max_bank_size, cfg.query_split: cfg.max_query_size},
                                 cfg.seed, cfg.precision, cfg.feature_dtype)
    common = {"batch_size": cfg.batch_size, "num_workers": cfg.num_workers, "seed": cfg.seed,
              "val_fraction": 0.0 if cfg.query_split == "test" else 0.1}
    features: dict[str, dict[str, dict]] = {}
    modules: dict[str, Any] = {}
    for entry in backbones:
        backbone = entry.build(cfg.seed)
        blocks = resolve_blocks(cfg.layers, backbone.num_layers, entry.id)
        backbone_key = {"id": entry.default_id, **entry.cache_key(backbone.weights_fingerprint(), cfg.seed)}
        for dataset in datasets:
            datamodule = dataset.build(backbone.preprocessing.to_dict(), common, cfg.data_root, cfg.download)
            modules.setdefault(dataset.label, datamodule)
            dataset_key = {"label": dataset.label, **dataset.cache_key(datamodule)}
            features.setdefault(entry.id, {})[dataset.label] = {
                split: collector.collect(backbone, backbone_key, dataset_key, datamodule, split, data, blocks)
                for split, data in split_datasets(datamodule, cfg.query_split).items()
            }
        backbone.cpu()
        del backbone
    extraction_seconds = time.time() - started
    if not is_rank_zero:
        return {}

    rows, cka_section = evaluate(features, metrics, block_metrics, cfg.knn_ks, cfg.knn_temperature,
                                 cfg.kmeans_n_init, cfg.seed, cfg.query_split, cfg.cka_debiased)
    comparisons, tables = [], []
    if pairs:
        from probing.synthetic_real import synthetic_vs_real

        for real, synthetic in pairs:
            pair_rows, report, table = synthetic_vs_real(features, modules, real, synthetic)
            rows += pair_rows
            comparisons.append(report)
            tables.append(table)
    plot_paths = draw_plots(run_dir / "plots", rows, cka_section, features, modules, pairs, cfg) if cfg.plots else []
    return finish(run_dir, rows, config, versions(), cka_section, comparisons, tables, collector, cache, runner,
                  plot_paths, [b.id for b in backbones], extraction_seconds, started)


def check_pairs(pairs: list[dict[str, str]] | None, labels: list[str]) -> list[tuple[str, str]]:
    checked = []
    for pair in pairs or []:
        if set(pair) != {"real", "synthetic"}:
            raise ValueError(f"--synthetic_vs_real entries are {{real: <dataset>, synthetic: <dataset>}}, got {pair}")
        for side in ("real", "synthetic"):
            if pair[side] not in labels:
                raise ValueError(f"--synthetic_vs_real: {side} dataset {pair[side]!r} is not among --datasets {labels}")
        checked.append((pair["real"], pair["synthetic"]))
    return checked


def draw_plots(out_dir: Path, rows, cka_section, features, modules, pairs, cfg) -> list[Path]:
    from probing import plots

    paths = []
    if cfg.embedding_map != "none":
        method = plots.map_method(cfg.embedding_map)
        for backbone, per_dataset in features.items():
            for dataset, splits in per_dataset.items():
                paths.append(plots.embedding_map(out_dir, backbone, dataset, splits, modules[dataset],
                                                 cfg.query_split, method, cfg.seed))
            for real, synthetic in pairs:
                paths.append(plots.synthetic_real_map(
                    out_dir, backbone, real, synthetic, per_dataset[real], per_dataset[synthetic],
                    list(modules[real].class_names), list(modules[synthetic].class_names), method, cfg.seed))
    paths += plots.cka_heatmaps(out_dir, cka_section)
    paths += plots.layer_curves(out_dir, rows)
    paths += plots.metric_bars(out_dir, rows)
    for stale in set(out_dir.glob("*.png")) - set(paths):  # from an earlier run under the same name
        stale.unlink()
    return paths


def finish(run_dir: Path, rows, config, versions, cka_section, comparisons, tables, collector, cache, runner,
           plot_paths, backbone_ids, extraction_seconds, started) -> dict[str, Any]:
    """Write results.csv / results.json and print the tables and where everything is."""
    from rich.console import Console

    from probing.report import best_layer_table, final_table, write_csv, write_json

    csv_path = write_csv(run_dir / "results.csv", rows)
    json_path = write_json(
        run_dir / "results.json", rows, run_dir=str(run_dir.resolve()), config=config, versions=versions,
        cka=cka_section, synthetic_vs_real=comparisons, features=collector.log,
        cache={"dir": str(cache.root), **dict(cache.stats)}, extraction_calls=runner.calls,
        plots=[str(p) for p in plot_paths],
        seconds={"extraction": round(extraction_seconds, 2), "total": round(time.time() - started, 2)},
    )
    console = Console(width=None if sys.stdout.isatty() else 160)  # logs: no folding at 80 columns
    console.print(final_table(rows, backbone_ids))
    if any(r["layer"] != "final" for r in rows):
        console.print(best_layer_table(rows))
    for table in tables:
        console.print(table)
    stats = dict(cache.stats)
    console.print(f"features      : {runner.calls} extractions, cache {stats} in {cache.root}")
    console.print(f"results       : {csv_path.resolve()}\n                {json_path.resolve()}")
    if plot_paths:
        console.print(f"plots         : {len(plot_paths)} PNGs in {(run_dir / 'plots').resolve()}")
    return {"run_dir": run_dir, "rows": rows, "plots": plot_paths, "cache": stats,
            "extraction_calls": runner.calls, "results_json": json_path, "results_csv": csv_path}


if __name__ == "__main__":
    main()
