"""The ``pixels`` backbone: raw pixels, un-normalised, flattened; and (real files) the published raw-pixel kNN
figure on Fashion-MNIST, checked prediction for prediction against scikit-learn."""

from __future__ import annotations

import gzip
import struct
import time

import numpy as np
import pytest
import torch

from datamodules.mnist import DEBIAN_FASHION_MNIST, FashionMNISTDataModule
from models.backbones import Backbone


def test_pixels_has_no_parameters_and_returns_grey_pixels_bit_exact():
    backbone = Backbone("pixels")
    prep = backbone.preprocessing
    assert (prep.input_size, prep.mean, prep.std) == (28, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert sum(p.numel() for p in backbone.parameters()) == 0 and backbone.num_layers == 0
    assert backbone.embed_dim == 784 and len(backbone.weights_fingerprint()) == 20
    grey = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)).expand(4, 3, 28, 28)
    assert torch.equal(backbone.embed(grey), grey[:, 0].reshape(4, 784))
    colour = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(backbone.embed(colour), colour.mean(1).reshape(2, 784))


def test_pixels_colour_option_resizing_and_refusals():
    colour = Backbone("pixels", colour=True, image_size=8)
    assert colour.embed_dim == 3 * 64 and colour.preprocessing.input_size == 8
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(colour.embed(x), x.reshape(2, 192))
    big = torch.rand(2, 3, 16, 16)
    expected = torch.nn.functional.interpolate(big, size=(8, 8), mode="bilinear", antialias=True).reshape(2, 192)
    torch.testing.assert_close(colour.embed(big), expected)
    with pytest.raises(ValueError, match="no weights to load"):
        Backbone("pixels", weights=__file__)
    with pytest.raises(ValueError, match="only the override 'colour'"):
        Backbone("pixels", depth=3)
    with pytest.raises(ValueError, match="could not find its blocks"):
        Backbone("pixels").layers(torch.rand(1, 3, 28, 28))


def test_pixels_through_the_datamodule_are_the_files_values_over_255(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 6)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", n, 28, 28) + images.tobytes()))
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(
            bytes([0, 0, 8, 1]) + struct.pack(">I", n) + (np.arange(n) % 10).astype(np.uint8).tobytes())
    backbone = Backbone("pixels")
    dm = FashionMNISTDataModule(root=str(tmp_path), preprocessing=backbone.preprocessing.to_dict(), num_workers=0,
                                val_fraction=0.0, batch_size=6)
    batch = next(iter(dm.test_dataloader()))
    features = backbone.embed(batch["image"])
    assert torch.equal((features * 255).round().to(torch.uint8), torch.from_numpy(images.reshape(6, 784)))


@pytest.mark.pretrained
@pytest.mark.slow
@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (make data)")
def test_pixels_knn_on_fashion_mnist_matches_scikit_learn_prediction_for_prediction(capsys):
    """60,000 x 10,000 x 784: Euclidean kNN, k=3, uniform votes; the published raw-pixel figure is 0.853.

    On 2 shared cores (load average ~5): extraction 34 s, geometry's kNN 31-39 s, scikit-learn's 52-62 s;
    ~2.3 min in all (the only slow test of this file).
    """
    from sklearn.neighbors import KNeighborsClassifier

    from features.extract import extract
    from geometry.knn import knn_predict

    backbone = Backbone("pixels")
    dm = FashionMNISTDataModule(preprocessing=backbone.preprocessing.to_dict(), val_fraction=0.0, num_workers=0,
                                batch_size=1000)
    started = time.perf_counter()
    bank = extract(backbone.embed, dm.make_loader(dm.bank_dataset()))
    query = extract(backbone.embed, dm.make_loader(dm.test_dataset()))
    extracted = time.perf_counter()
    raw = torch.from_numpy(dm.sources.train.source.images.reshape(60000, 784).copy())
    assert torch.equal((bank["embedding"] * 255).round().to(torch.uint8), raw)  # the raw pixels, nothing else
    assert torch.equal(bank["index"], torch.arange(60000)) and torch.equal(query["index"], torch.arange(10000))
    ours = knn_predict(bank["embedding"], bank["label"], query["embedding"], ks=(3,), temperature=None,
                       distance="euclidean")[3]
    ours_done = time.perf_counter()
    reference = KNeighborsClassifier(n_neighbors=3).fit(bank["embedding"].numpy(), bank["label"].numpy())
    theirs = torch.from_numpy(reference.predict(query["embedding"].numpy()))
    with capsys.disabled():
        print(f"\npixels kNN on Fashion-MNIST: extraction {extracted - started:.1f} s, geometry.knn "
              f"{ours_done - extracted:.1f} s, scikit-learn {time.perf_counter() - ours_done:.1f} s")
    assert int((ours != theirs).sum()) == 0
    accuracy = float((ours == query["label"]).double().mean())
    assert abs(accuracy - 0.854) < 0.001, accuracy
