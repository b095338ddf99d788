"""extract: images/s through the DataModule + backbone vs a pure forward pass over pre-loaded tensors.

The quickstart's backbone and digits (train split, un-augmented, the GeometryEval bank): ``features.extract``
over ``bank_dataloader()`` (decode, resize, normalise, collate, forward, NaN check, copy back) against the
backbone alone on the same images already transformed and stacked in memory, in batches of the same size.
On a GPU it also measures DINOv2-small (random weights) at bf16, batch 256, 224 px: images/s and the fraction
of the GPU's peak dense bf16 throughput that represents (FLOPs counted by torch's FlopCounterMode).
"""

from __future__ import annotations

import torch

from bench.common import Result, synchronize, timed, timed_pair
from bench.quickstart import build_backbone, build_datamodule

FULL = {"limit_data": None, "repeats": 3, "dinov2_batches": 20}
QUICK = {"limit_data": 64, "repeats": 1, "dinov2_batches": 2}
TARGET = 0.8
# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) by device-name fragment, from the vendors' data sheets.
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 756e12,
             "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12}


def gpu_peak_bf16() -> float | None:
    name = torch.cuda.get_device_name()
    return next((peak for fragment, peak in PEAK_BF16.items() if fragment in name), None)


def pure_forward(backbone, images: torch.Tensor, batch_size: int, device: str) -> int:
    with torch.no_grad():
        for chunk in images.split(batch_size):
            backbone.embed(chunk.to(device, non_blocking=True)).float().cpu()
    return len(images)


def dinov2_bf16(size: dict) -> Result:
    from torch.utils.flop_counter import FlopCounterMode

    from models.backbones import Backbone

    batch = 256
    backbone = Backbone("dinov2-small", weights="random", freeze="all").eval().cuda()
    side = backbone.preprocessing.input_size
    images = torch.randn(batch, 3, side, side, device="cuda")

    def forward_batches(count: int) -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(count):
                backbone.embed(images)

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), FlopCounterMode(display=False) as flops:
        backbone.embed(images)
    flops_per_image = flops.get_total_flops() / batch
    run_t = timed(lambda: forward_batches(size["dinov2_batches"]), "cuda", warmup=lambda: forward_batches(3))
    per_second = size["dinov2_batches"] * batch / run_t.seconds
    peak = gpu_peak_bf16()
    fraction = per_second * flops_per_image / peak if peak else float("nan")
    synchronize("cuda")
    return Result("extract", f"DINOv2-small (random init), bf16, batch {batch}, {side} px: "
                  f"{per_second:,.0f} images/s, {flops_per_image / 1e9:.1f} GFLOP/image",
                  run_t.seconds, float("nan"), fraction, f"of {torch.cuda.get_device_name()}'s bf16 peak"
                  + (f" ({peak / 1e12:.0f} TFLOP/s)" if peak else " (peak unknown)"), "—", None,
                  f"{per_second * flops_per_image / 1e12:.0f} TFLOP/s achieved", True,
                  {"GPU": run_t.device_peak_mb})


def run(quick: bool, device: str) -> list[Result]:
    from features.extract import extract

    size = QUICK if quick else FULL
    _, backbone = build_backbone(device)
    datamodule = build_datamodule(backbone.preprocessing, size["limit_data"])
    dataset = datamodule.bank_dataset()
    batch_size = datamodule.batch_size
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    if torch.device(device).type == "cuda":
        images = images.pin_memory()

    def through_loader():
        return extract(backbone.embed, datamodule.bank_dataloader(), device)

    loader_t, pure_t = timed_pair(through_loader, lambda: pure_forward(backbone, images, batch_size, device),
                                  device, repeats=size["repeats"],
                                  warmup=lambda: pure_forward(backbone, images[:batch_size], batch_size, device))
    with torch.no_grad():
        expected = torch.cat([backbone.embed(c.to(device)).float().cpu() for c in images[:batch_size].split(8)])
    gap = float((loader_t.value["embedding"][:batch_size] - expected).abs().max())
    n = len(images)
    fraction = pure_t.seconds / loader_t.seconds
    results = [Result(
        "extract", f"{n} digits at {images.shape[-1]} px, batch {batch_size}, num_workers "
        f"{datamodule.num_workers}: {n / loader_t.seconds:,.0f} vs {n / pure_t.seconds:,.0f} images/s",
        loader_t.seconds, pure_t.seconds, fraction, "of pure-forward images/s", f"≥ {TARGET:.0%}",
        fraction >= TARGET, f"same embeddings (max |diff| {gap:.1e})", gap <= 1e-3,
        {"DataModule + backbone": loader_t.peak_mb, "pure forward": pure_t.peak_mb})]
    if torch.device(device).type == "cuda":
        results.append(dinov2_bf16(size))
    return results
