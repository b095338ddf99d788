"""Families whose packages cannot be installed here: the clear error, and the code path run on a stand-in.

AIM v1 needs Apple's aim-v1 (from source); MambaVision's remote code needs the CUDA-only mamba-ssm; open_clip
is an optional extra. Stand-ins mirror the real module layout (AIM: preprocessor / trunk.blocks /
post_trunk_norm / head; MambaVision: a transformers remote-code repo whose model returns (pooled, stage maps)).
"""

from __future__ import annotations

import json
import logging
import sys
import textwrap
import types

import pytest
import torch
from torch import nn

from models.backbones import Backbone
from models.pretrained_files import WeightsLoadError

# ------------------------------------------------------------------------------------------- open_clip


def test_missing_open_clip_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        Backbone("clip-vit-b32", weights="random")


# ------------------------------------------------------------------------------------------- AIM v1


class _AimBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm_1, self.mlp = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        return x + self.mlp(self.norm_1(x))


class _AimTrunk(nn.Module):
    def __init__(self, dim: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(_AimBlock(dim) for _ in range(depth))
        self.post_trunk_norm = nn.LayerNorm(dim)

    def forward(self, tokens, mask=None, max_block_id=-1, return_features=False):
        features = []
        for block in self.blocks:
            tokens = block(tokens)
            features.append(tokens)
        return features if return_features else (self.post_trunk_norm(tokens), features)


class _AimPreprocessor(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.patchifier = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x, mask=None):
        return self.patchifier(x).flatten(2).transpose(1, 2)


class FakeAIMForImageClassification(nn.Module):
    """Stand-in for aim.v1.torch.models.AIMForImageClassification (config dict in, hub-mixin loading)."""

    loads: list[dict] = []

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.preprocessor = _AimPreprocessor(config["embed_dim"], config["patch_size"])
        self.trunk = _AimTrunk(config["embed_dim"], config["num_blocks"])
        self.head = nn.Linear(config["embed_dim"], config["num_classes"])

    @classmethod
    def from_pretrained(cls, location: str, strict: bool = False):
        cls.loads.append({"location": location, "strict": strict})
        with open(f"{location}/config.json") as handle:
            model = cls(json.load(handle))
        model.load_state_dict(torch.load(f"{location}/pytorch_model.bin", weights_only=True), strict=strict)
        return model


TINY_AIM = dict(embed_dim=16, num_blocks=3, num_heads=2, patch_size=8, num_classes=5)


@pytest.fixture
def fake_aim(monkeypatch):
    models = types.ModuleType("aim.v1.torch.models")
    models.AIMForImageClassification = FakeAIMForImageClassification
    for name in ("aim", "aim.v1", "aim.v1.torch"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "aim.v1.torch.models", models)
    FakeAIMForImageClassification.loads = []
    return FakeAIMForImageClassification


def test_missing_aim_v1_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "aim", None)
    with pytest.raises(ImportError, match=r"aim-v1 package.*not on PyPI.*ml-aim\.git#subdirectory=aim-v1"):
        Backbone("aim-600m", weights="random")


def test_aim_v1_code_path_on_a_stand_in(fake_aim, tmp_path):
    backbone = Backbone("aim-600m", weights="random", image_size=32, **TINY_AIM)
    x = torch.randn(2, 3, 32, 32)
    tokens = backbone.model.preprocessor(x)
    for block in backbone.model.trunk.blocks:
        tokens = block(tokens)
    expected = backbone.model.trunk.post_trunk_norm(tokens).mean(1)  # mean of the final-normed tokens
    assert torch.allclose(backbone.embed(x), expected)
    assert backbone.embed_dim == 16 and backbone.num_layers == 3 and len(backbone.layers(x)) == 3
    assert backbone.preprocessing.input_size == 32 and backbone.preprocessing.mean == (0.485, 0.456, 0.406)
    backbone.set_freeze("partial:1")
    trainable = {n for n, p in backbone.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in backbone.model.named_parameters()
                         if n.startswith(("trunk.blocks.1.", "trunk.blocks.2.", "trunk.post_trunk_norm."))}

    torch.save(backbone.model.state_dict(), tmp_path / "aim.pth")  # state-dict file round trip
    loaded = Backbone("aim-600m", weights=str(tmp_path / "aim.pth"), image_size=32, **TINY_AIM)
    assert torch.equal(loaded.embed(x), backbone.embed(x))

    (tmp_path / "hub").mkdir()  # hub-mixin directory: must be loaded strictly
    (tmp_path / "hub" / "config.json").write_text(json.dumps({**backbone.model.config}))
    torch.save(backbone.model.state_dict(), tmp_path / "hub" / "pytorch_model.bin")
    from_dir = Backbone("aim-600m", weights=str(tmp_path / "hub"), image_size=32)
    assert torch.equal(from_dir.embed(x), backbone.embed(x))
    assert fake_aim.loads == [{"location": str(tmp_path / "hub"), "strict": True}]


# ------------------------------------------------------------------------------------------- MambaVision

FAKE_CONFIG = """
from transformers import PretrainedConfig


class FakeMambaVisionConfig(PretrainedConfig):
    model_type = "fake_mambavision"

    def __init__(self, dims=(8, 16, 32, 64), depths=(1, 1, 2, 1), **kwargs):
        self.dims, self.depths = list(dims), list(depths)
        super().__init__(**kwargs)
"""
FAKE_MODEL = """
import mamba_ssm  # noqa: F401  (NVIDIA's remote code imports it at module level)
import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_fake_mambavision import FakeMambaVisionConfig


class Level(nn.Module):
    def __init__(self, dim_in, dim, depth):
        super().__init__()
        self.downsample = nn.Conv2d(dim_in, dim, 3, 2, 1)
        self.blocks = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1) for _ in range(depth))

    def forward(self, x):
        x = self.downsample(x)
        for block in self.blocks:
            x = x + torch.relu(block(x))
        return x


class MambaVision(nn.Module):
    def __init__(self, dims, depths):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dims[0], 4, 4)
        self.levels = nn.ModuleList(Level(a, b, d) for a, b, d in zip([dims[0], *dims[:-1]], dims, depths))
        self.norm = nn.BatchNorm2d(dims[-1])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(dims[-1], 10)

    def forward_features(self, x):
        x = self.patch_embed(x)
        outs = []
        for level in self.levels:
            x = level(x)
            outs.append(x)
        return torch.flatten(self.avgpool(self.norm(x)), 1), outs


class FakeMambaVisionModel(PreTrainedModel):
    config_class = FakeMambaVisionConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = MambaVision(config.dims, config.depths)
        self.post_init()

    def forward(self, tensor):
        return self.model.forward_features(tensor)
"""


@pytest.fixture
def mamba_repo(tmp_path, monkeypatch):
    """A local remote-code repo laid out like nvidia/MambaVision-T-1K, plus an importable `mamba_ssm` stub."""
    import transformers.dynamic_module_utils as dynamic_modules
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel

    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setitem(sys.modules, "mamba_ssm", types.ModuleType("mamba_ssm"))
    repo = tmp_path / "MambaVision-T-1K"
    repo.mkdir()
    (repo / "configuration_fake_mambavision.py").write_text(textwrap.dedent(FAKE_CONFIG))
    (repo / "modeling_fake_mambavision.py").write_text(textwrap.dedent(FAKE_MODEL))
    (repo / "config.json").write_text(json.dumps({
        "model_type": "fake_mambavision", "dims": [8, 16, 32, 64], "depths": [1, 1, 2, 1],
        "auto_map": {"AutoConfig": "configuration_fake_mambavision.FakeMambaVisionConfig",
                     "AutoModel": "modeling_fake_mambavision.FakeMambaVisionModel"},
    }))
    reference = AutoModel.from_config(AutoConfig.from_pretrained(repo, trust_remote_code=True),
                                      trust_remote_code=True).eval()
    save_file(reference.state_dict(), repo / "model.safetensors")
    return repo, reference


def test_mambavision_needs_the_trust_remote_code_opt_in():
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        Backbone("mambavision-t")


def test_mambavision_without_mamba_ssm_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)
    with pytest.raises(ImportError, match=r"mamba_ssm.*pip install mamba-ssm.*CUDA|CUDA.*pip install mamba-ssm"):
        Backbone("mambavision-t", trust_remote_code=True)


def test_mambavision_code_path_on_a_remote_code_stand_in(mamba_repo, caplog):
    repo, reference = mamba_repo
    with caplog.at_level(logging.WARNING):
        backbone = Backbone("mambavision-t", weights=str(repo), trust_remote_code=True, image_size=32)
    assert "trust_remote_code=True" in caplog.text
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # the model's own average-pooled output (Backbone runs conv nets channels-last: float rounding apart)
        torch.testing.assert_close(backbone.embed(x), reference(x)[0], rtol=1e-5, atol=1e-6)
        stages = backbone.layers(x)
        one_pass, one_pass_stages = backbone.embed_and_layers(x)
        assert torch.equal(one_pass, backbone.embed(x))
        assert all(torch.equal(a, b) for a, b in zip(one_pass_stages, stages, strict=True))
    assert backbone.embed_dim == 64 and backbone.num_layers == 4
    assert [tuple(s.shape) for s in stages] == [(2, 8), (2, 16), (2, 32), (2, 64)]
    assert backbone.preprocessing.input_size == 32
    backbone.set_freeze("partial:2")
    trainable = {n for n, p in backbone.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in backbone.model.named_parameters()
                         if n.startswith(("model.levels.2.", "model.levels.3.", "model.norm."))}
    backbone.set_freeze("none")
    assert not any(p.requires_grad for n, p in backbone.model.named_parameters() if n.startswith("model.head."))


def test_mambavision_checkpoint_missing_weights_is_not_silently_random(mamba_repo):
    from safetensors.torch import load_file, save_file

    repo, _ = mamba_repo
    state = load_file(repo / "model.safetensors")
    del state["model.levels.2.blocks.1.weight"]
    save_file(state, repo / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsLoadError, match=r"missing keys .*model\.levels\.2\.blocks\.1\.weight"):
        Backbone("mambavision-t", weights=str(repo), trust_remote_code=True)
