"""Real pretrained weights that install offline (EfficientNet-Lite0) and checkpoint layouts that fool loaders."""

from __future__ import annotations

import pytest
import torch
from helpers.photos import center_square

from models.backbones import Backbone
from models.pretrained_files import WeightsLoadError, efficientnet_lite0_state_dict

PALACE, DAISY = 698, 985  # ImageNet-1k class indices



@pytest.mark.pretrained
def test_efficientnet_lite0_is_really_imagenet_pretrained():
    from sklearn.datasets import load_sample_images

    backbone = Backbone("efficientnet-lite0", weights="pretrained")
    prep = backbone.preprocessing
    assert (prep.input_size, prep.mean, prep.std) == (224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    photos = load_sample_images()
    names = [path.rsplit("/", 1)[-1] for path in photos.filenames]
    batch = torch.cat([center_square(image, 224, prep.mean, prep.std) for image in photos.images])
    with torch.no_grad():
        top5 = backbone.imagenet_logits(batch).topk(5).indices.tolist()
        embedding = backbone.embed(batch)
    assert PALACE in top5[names.index("china.jpg")]
    assert DAISY in top5[names.index("flower.jpg")]
    assert embedding.shape == (2, 1280) and backbone.num_layers == 16


def test_efficientnet_lite0_package_maps_key_for_key_onto_timm():
    import timm

    model = timm.create_model("tf_efficientnet_lite0")
    renamed = efficientnet_lite0_state_dict(model)
    assert set(renamed) == set(model.state_dict())
    assert all(renamed[key].shape == value.shape for key, value in model.state_dict().items())


def _tiny_flava_config():
    from transformers import FlavaConfig

    layer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return FlavaConfig(image_config=dict(layer, image_size=28, patch_size=14),
                       text_config=dict(layer, vocab_size=100), multimodal_config=dict(layer, num_hidden_layers=1),
                       image_codebook_config=dict(hidden_size=8, num_groups=1, num_blocks_per_group=1, vocab_size=16),
                       hidden_size=32, projection_dim=16)


@pytest.mark.parametrize("checkpoint_class", ["FlavaForPreTraining", "FlavaModel"])
def test_flava_image_tower_loads_from_full_flava_checkpoints(tmp_path, checkpoint_class):
    """facebook/flava-full holds every tower; plain FlavaImageModel.from_pretrained leaves the FlavaModel layout
    silently random. The registry's key mapping must load every image-tower tensor from both layouts."""
    import transformers

    full = getattr(transformers, checkpoint_class)(_tiny_flava_config()).eval()
    full.save_pretrained(tmp_path)
    tower = full.flava.image_model if checkpoint_class == "FlavaForPreTraining" else full.image_model
    backbone = Backbone("flava", weights=str(tmp_path), image_size=28)
    for key, value in tower.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[key], value), key
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(backbone.embed(x), tower(pixel_values=x).last_hidden_state[:, 0])


def test_flava_checkpoint_missing_image_tower_tensors_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import FlavaModel

    FlavaModel(_tiny_flava_config()).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["image_model.encoder.layer.0.attention.attention.query.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsLoadError, match=r"missing keys .*encoder\.layer\.0\.attention\.attention\.query"):
        Backbone("flava", weights=str(tmp_path), image_size=28)
