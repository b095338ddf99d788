"""A probe run: backbones x datasets -> cached features -> suite metrics -> results.csv / .json, tables, plots.

``probe.py`` parses the options and calls :func:`run_probe`; everything a run does lives here.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from geometry.suite import MetricSettings


def metric_progress(line: str) -> None:
    """One line per evaluated layer on stderr, beside the extraction's progress lines."""
    print(line, file=sys.stderr, flush=True)


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


def resolve_query_split(datamodule, query_split: str) -> str:
    """``auto`` -> the one rule GeometryEval follows too (``BaseDataModule.query_dataset``): the validation split
    when the DataModule has validation samples, else test."""
    if query_split == "auto":
        return "val" if len(datamodule.val_dataset()) else "test"
    if query_split == "val" and len(datamodule.val_dataset()) == 0:
        raise ValueError(f"{type(datamodule).__name__} has no validation samples; use --query_split test or auto")
    return query_split


def split_datasets(datamodule, query_split: str) -> dict[str, tuple[str, Any]]:
    """The splits a probe reads, as ``{role: (split name, dataset)}``: ``train`` (the bank), ``query`` (scored;
    see :func:`resolve_query_split`) and ``novel`` (held-out sub-classes) where they exist."""
    name = resolve_query_split(datamodule, query_split)
    query = datamodule.val_dataset() if name == "val" else datamodule.test_dataset()
    splits = {"train": ("train", datamodule.bank_dataset()), "query": (name, query)}
    if hasattr(datamodule, "novel_dataset"):
        novel = datamodule.novel_dataset()
        if len(novel):
            splits["novel"] = ("novel", novel)
    return splits


def shifted_features(collector, backbone, backbone_key: dict, dataset_key: dict, datamodule, label: str,
                     splits: dict[str, tuple[str, Any]], clean: dict[str, dict], shifts: list[tuple[str, int]]
                     ) -> dict[str, dict[str, dict]]:
    """``--query_shifts``: per (corruption, severity), the final embedding of the corrupted query split against
    the clean bank, filed as dataset ``<label>+<corruption>:<severity>``.

    The corrupted split is cached like any other, under split ``<split>+<corruption>:<severity>`` (so the
    corruption is part of the key) and with the query split's size cap; novel sub-classes are not corrupted and
    not used here.
    """
    from datamodules.corruptions import RECIPE_VERSION, CorruptedDataset, shift_name
    from probing.extract import FINAL_LAYER

    split, query = splits["query"]
    shifted_key = {**dataset_key, "corruption_recipe": RECIPE_VERSION}  # a changed recipe misses the cache
    out = {}
    for corruption, severity in shifts:
        name = f"{split}+{shift_name(corruption, severity)}"
        collector.max_sizes.setdefault(name, collector.max_sizes.get(split))
        corrupted = CorruptedDataset(query, corruption, severity, backbone.preprocessing.mean,
                                     backbone.preprocessing.std)
        features = collector.collect(backbone, backbone_key, shifted_key, datamodule, name, corrupted, [])
        out[f"{label}+{shift_name(corruption, severity)}"] = {"train": {FINAL_LAYER: clean["train"][FINAL_LAYER]},
                                                              "query": features}
    return out


def run_probe(cfg, settings: MetricSettings, config_text: str) -> dict[str, Any]:
    """Run a probe from probe.py's parsed options; returns ``{"run_dir", "rows", "plots", "cache",
    "extraction_calls", ...}`` (empty on ranks > 0). ``config_text`` is written as the run's config.yaml."""
    from lightning.pytorch.utilities import rank_zero_only

    from datamodules.corruptions import parse_shifts
    from probing.cache import FeatureCache
    from probing.evaluate import check_metrics, evaluate
    from probing.extract import ExtractionRunner, FeatureCollector, cache_keys, normalise_precision
    from probing.result_cache import ResultCache
    from probing.specs import parse_backbone, parse_dataset, unique_labels
    from report.run_info import versions

    started = time.time()
    metrics = check_metrics(cfg.metrics)
    shifts = parse_shifts(getattr(cfg, "query_shifts", None))  # a malformed shift fails before any extraction
    block_metrics = check_metrics(cfg.layer_metrics if cfg.layer_metrics is not None else cfg.metrics,
                                  "layer_metrics")
    if cfg.query_split not in ("auto", "test", "val"):
        raise ValueError(f"--query_split must be 'auto', 'test' or 'val', got {cfg.query_split!r}")
    if cfg.embedding_map not in ("auto", "pca", "umap", "none"):
        raise ValueError(f"--embedding_map must be auto, pca, umap or none, got {cfg.embedding_map!r}")
    backbones = [parse_backbone(entry, cfg.image_size) for entry in cfg.backbones]
    datasets = [parse_dataset(entry) for entry in cfg.datasets]
    unique_labels([b.id for b in backbones], "backbones")
    unique_labels([d.label for d in datasets], "datasets")
    for dataset in datasets:
        dataset.datamodule_class()  # a missing dataset module fails now, before any extraction
    pairs = check_pairs(cfg.synthetic_vs_real, [d.label for d in datasets])
    if cfg.compare:
        compare_pairs(cfg.compare, [b.id for b in backbones])  # a bad pair fails now, before any extraction
    cfg.precision = normalise_precision(cfg.precision)

    is_rank_zero = rank_zero_only.rank == 0
    run_dir = Path(cfg.runs_dir) / f"probe-{cfg.name or time.strftime('%Y%m%d-%H%M%S')}"
    config = {k: v for k, v in cfg.as_dict().items() if k != "config"}
    check_before_work(backbones, run_dir)

    runner = ExtractionRunner(cfg.accelerator, cfg.devices, cfg.strategy, cfg.num_nodes, cfg.precision,
                              cfg.feature_dtype, cfg.progress, getattr(cfg, "shard_metrics", None))
    # Sharded (several processes, --shard_metrics not false): every rank extracts, caches and keeps its own rows.
    comm = runner.start_processes() if runner.sharded else None
    cache = FeatureCache(cfg.cache_dir, enabled=cfg.cache, rebuild=cfg.rebuild_cache,
                         writable=is_rank_zero or comm is not None)
    max_sizes = {"train": cfg.max_bank_size, "val": cfg.max_query_size, "test": cfg.max_query_size}
    collector = FeatureCollector(runner, cache, max_sizes, settings.seed, cfg.precision, cfg.feature_dtype, comm)
    # The whole train split is the bank unless validation queries are asked for (a dataset's own
    # init_args.val_fraction still wins, and --query_split auto then scores on its val split).
    common = {"batch_size": cfg.batch_size, "num_workers": cfg.num_workers, "seed": settings.seed,
              "val_fraction": 0.1 if cfg.query_split == "val" else 0.0}
    features: dict[str, dict[str, dict]] = {}
    shifted: dict[str, dict[str, dict]] = {}  # --query_shifts: backbone -> "<dataset>+<shift>" -> splits
    query_splits: dict[str, str] = {}
    modules: dict[str, Any] = {}
    for entry in backbones:
        backbone = entry.build(settings.seed)
        blocks = resolve_blocks(cfg.layers, backbone.num_layers, entry.id)
        for dataset in datasets:
            datamodule = dataset.build(backbone.preprocessing.to_dict(), common, cfg.data_root, cfg.download)
            modules.setdefault(dataset.label, datamodule)
            backbone_key, dataset_key = cache_keys(entry, backbone, dataset, datamodule, settings.seed)
            splits = split_datasets(datamodule, cfg.query_split)
            features.setdefault(entry.id, {})[dataset.label] = {
                role: collector.collect(backbone, backbone_key, dataset_key, datamodule, split, data, blocks)
                for role, (split, data) in splits.items()
            }
            if shifts:
                shifted.setdefault(entry.id, {}).update(shifted_features(
                    collector, backbone, backbone_key, dataset_key, datamodule, dataset.label, splits,
                    features[entry.id][dataset.label], shifts))
            query_splits[dataset.label] = resolve_query_split(datamodule, cfg.query_split)
        backbone.cpu()
        del backbone
    extraction_seconds = time.time() - started
    if not is_rank_zero and comm is None:
        return {}

    per_query: dict = {}
    progress = metric_progress if cfg.progress and is_rank_zero else None
    results = ResultCache.beside(cache) if comm is None else None  # the metric values of earlier runs
    rows, cka_section = evaluate(features, metrics, block_metrics, settings, cfg.cka_debiased, per_query, comm,
                                 progress, results)
    shift_rows = evaluate(shifted, [m for m in metrics if m != "cka"], [], settings, cfg.cka_debiased,
                          comm=comm, progress=progress, results=results)[0] if shifted else []
    if comm is not None:  # what follows (similarities, comparisons, maps) reads the queries whole, on rank 0
        features = whole_queries(comm, features, keep_bank={label for pair in pairs for label in pair})
        if not is_rank_zero:
            return {}
    if cfg.similarities:
        from probing.evaluate import similarity_matrices

        similarity_rows, similarity_section = similarity_matrices(features, cfg.similarities, settings,
                                                                  layers=cfg.layers != "final")
        rows += similarity_rows
        cka_section["similarities"] = similarity_section  # results.json section "cka" holds every similarity matrix
    if cfg.compare:
        from probing.evaluate import paired_comparisons

        rows += paired_comparisons(per_query, features, compare_pairs(cfg.compare, [b.id for b in backbones]),
                                   settings)
    cka_section["split"] = query_splits
    comparisons, tables = [], []
    if pairs:
        from probing.synthetic_real import synthetic_vs_real

        for real, synthetic in pairs:
            pair_rows, report, table = synthetic_vs_real(features, modules, real, synthetic)
            rows += pair_rows
            comparisons.append(report)
            tables.append(table)
    plot_paths = draw_plots(run_dir / "plots", rows, cka_section, features, modules, pairs, cfg, settings) \
        if cfg.plots else []
    if shift_rows and cfg.plots:
        from probing.shift_plots import severity_curves

        plot_paths += severity_curves(run_dir / "plots", rows + shift_rows, shifts)
    rows += shift_rows
    from report.io import atomic_write_text

    # Written with the results, not before the work: a probe that fails leaves an earlier run's files as they were.
    atomic_write_text(run_dir / "config.yaml", config_text)
    return finish(run_dir, rows, config, versions(), cka_section, comparisons, tables, collector, cache, results,
                  runner, plot_paths, [b.id for b in backbones], extraction_seconds, started)




def whole_queries(comm, features: dict[str, dict[str, dict]], keep_bank: set[str]) -> dict[str, dict[str, dict]]:
    """A sharded run's ``features`` with every split but the bank gathered whole on every process (queries and
    novel sub-classes are small); the bank (``train``) is dropped, except for the datasets in ``keep_bank``
    (``--synthetic_vs_real`` pools every split of its small datasets)."""
    from geometry.comm import gather_feature_set

    return {backbone: {dataset: {split: {layer: gather_feature_set(comm, values) for layer, values in layers.items()}
                                 for split, layers in splits.items() if split != "train" or dataset in keep_bank}
                       for dataset, splits in per_dataset.items()}
            for backbone, per_dataset in features.items()}


def check_before_work(backbones, run_dir: Path) -> None:
    """What would fail after minutes of extraction fails now: an unknown backbone name, an unwritable run folder."""
    from models.backbone_registry import resolve_spec
    from probing.cache import unwritable_reason

    for entry in backbones:
        resolve_spec(entry.name)
    problem = unwritable_reason(run_dir)
    if problem:
        raise ValueError(f"cannot write the probe's results to {run_dir} ({problem}); choose another --runs_dir")


def compare_pairs(compare: list[list[str]], backbones: list[str]) -> list[tuple[str, str]]:
    """``--compare`` as (a, b) pairs of backbone labels; ``[[all]]``: every backbone against the first."""
    if compare == [["all"]]:
        return [(other, backbones[0]) for other in backbones[1:]]
    pairs = []
    for pair in compare:
        if len(pair) != 2 or any(name not in backbones for name in pair):
            raise ValueError(f"--compare takes pairs of backbone labels among {backbones} (or [[all]]), got {pair}")
        pairs.append((pair[0], pair[1]))
    return pairs


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


def draw_plots(out_dir: Path, rows, cka_section, features, modules, pairs, cfg, settings) -> list[Path]:
    from probing import plots
    from report.figures import map_method

    paths = []
    if cfg.embedding_map != "none":
        method = map_method(cfg.embedding_map)
        for backbone, per_dataset in features.items():
            for dataset, splits in per_dataset.items():
                paths.append(plots.embedding_map(out_dir, backbone, dataset, splits, modules[dataset],
                                                 "query", method, settings.seed,
                                                 split_name=cka_section.get("split", {}).get(dataset)))
            for real, synthetic in pairs:
                paths.append(plots.synthetic_real_map(
                    out_dir, backbone, real, synthetic, per_dataset[real], per_dataset[synthetic],
                    list(modules[real].class_names), list(modules[synthetic].class_names), method, settings.seed))
    paths += plots.cka_heatmaps(out_dir, cka_section)
    paths += plots.similarity_heatmaps(out_dir, cka_section.get("similarities", {}))
    paths += plots.layer_curves(out_dir, rows)
    paths += plots.metric_bars(out_dir, rows)
    for stale in set(out_dir.glob("*.png")) - set(paths):  # from an earlier run under the same name
        if not stale.name.startswith("shift_"):  # severity curves are drawn next (probing.shift_plots)
            stale.unlink()
    return paths


def finish(run_dir: Path, rows, config, versions, cka_section, comparisons, tables, collector, cache, results, runner,
           plot_paths, backbone_ids, extraction_seconds, started) -> dict[str, Any]:
    """Write results.csv / results.json and print the tables and where everything is."""
    from rich.console import Console

    from probing.report import best_layer_table, final_table, write_csv, write_json

    csv_path = write_csv(run_dir / "results.csv", rows)
    json_path = write_json(
        run_dir / "results.json", rows, run_dir=str(run_dir.resolve()), config=config, versions=versions,
        cka=cka_section, synthetic_vs_real=comparisons, features=collector.log,
        cache={"dir": str(cache.root), **dict(cache.stats), "metric_results": dict(results.stats) if results else {}},
        extraction_calls=runner.calls,
        plots=[str(p) for p in plot_paths],
        seconds={"extraction": round(extraction_seconds, 2), "total": round(time.time() - started, 2)},
    )
    from probing.report import is_headline, lower_is_better
    from report.html import update_run_report

    page = update_run_report(run_dir, json.loads(json_path.read_text()), is_headline=is_headline,
                             lower_is_better=lower_is_better)
    console = Console(width=None if sys.stdout.isatty() else 160)  # logs: no folding at 80 columns
    console.print(final_table(rows, backbone_ids))
    if any(r["layer"] != "final" for r in rows):
        console.print(best_layer_table(rows))
    for table in tables:
        console.print(table)
    stats = dict(cache.stats)
    console.print(f"features      : {runner.calls} extractions, cache {stats} in {cache.root}")
    if results is not None:
        console.print(f"metric values : result cache {dict(results.stats)} in {results.root}")
    console.print(f"results       : {csv_path.resolve()}\n                {json_path.resolve()}")
    if plot_paths:
        console.print(f"plots         : {len(plot_paths)} PNGs in {(run_dir / 'plots').resolve()}")
    if page:
        console.print(f"report        : {page.resolve()}")
    return {"run_dir": run_dir, "rows": rows, "plots": plot_paths, "cache": stats,
            "extraction_calls": runner.calls, "results_json": json_path, "results_csv": csv_path}
