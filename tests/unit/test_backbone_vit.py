"""ViT backbones: patch-token maps of chosen blocks, MAE weights from a file, the cache."""

from __future__ import annotations

import pytest
import timm
import torch

from anomaly_bench.backbones.cache import FeatureCache
from anomaly_bench.backbones.vit import VitExtractor
from anomaly_bench.errors import ConfigError
from anomaly_bench.methods.common import build_extractor

NAME = "vit_tiny_patch16_224"  # 12 blocks of width 192: the ViT-B/16 layout, small


def _reference(model: torch.nn.Module, images: torch.Tensor, picks: list[int]) -> dict:
    """The blocks' patch tokens computed step by step from timm's modules."""
    b, _, h, w = images.shape
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    out = {}
    for i, block in enumerate(model.blocks):
        x = block(x)
        if i in picks:
            tokens = x[:, model.num_prefix_tokens:]
            out[f"block{i}"] = tokens.reshape(b, h // 16, w // 16, -1).permute(0, 3, 1, 2)
    return out


@pytest.mark.parametrize("size", [224, 64])
def test_blocks_are_patch_token_grids(size):
    ext = VitExtractor(NAME, [2, -1], pretrained=False, seed=0)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = ext(images)
        ref = _reference(ext.model, images, [2, 11])
    assert list(feats) == ["block2", "block11"] and ext.tag == "blocks.2+blocks.11"
    assert ext.channels == {"block2": 192, "block11": 192}
    assert ext.strides == {"block2": 16, "block11": 16}
    for k, v in feats.items():
        assert v.shape == (2, 192, size // 16, size // 16)
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-5)
    assert ext.mean == (0.5, 0.5, 0.5) and ext.weights_tag == "random(seed=0)"


def test_mae_checkpoint_file_loads_the_encoder_and_ignores_the_decoder(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(7)
        donor = timm.create_model(NAME, pretrained=False, num_classes=0)
    encoder = donor.state_dict()
    mae = {"model": {**encoder, "mask_token": torch.zeros(1, 1, 128),
                     "decoder_embed.weight": torch.zeros(128, 192),
                     "decoder_pred.weight": torch.zeros(768, 128)}}
    path = tmp_path / "mae_visualize_vit_tiny.pth"
    torch.save(mae, path)
    cfg = {"name": NAME, "kind": "vit", "hub_tag": None, "pretrained": True,
           "weights": str(path), "weights_url": "https://example.invalid/mae.pth",
           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    ext = build_extractor(cfg, {"layer1": None, "blocks": [3]}, seed=0)
    assert ext.weights_tag.startswith("file:mae_visualize_vit_tiny.pth#")
    assert ext.mean == (0.485, 0.456, 0.406) and ext.std == (0.229, 0.224, 0.225)
    for k, v in encoder.items():
        assert torch.equal(ext.model.state_dict()[k], v), k


def test_the_feature_cache_serves_vit_blocks(tmp_path):
    from anomaly_bench.backbones.cache import flush_writes
    from anomaly_bench.memo import MEMO

    MEMO.configure(0)
    plain = VitExtractor(NAME, [1, 4], pretrained=False, seed=0)
    cached = VitExtractor(NAME, [1, 4], pretrained=False, seed=0)
    cached.attach_cache(FeatureCache(tmp_path, cached.backbone_id))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = plain(images)
        first = cached(images)
        flush_writes()
        other = VitExtractor(NAME, [2], pretrained=False, seed=0)  # another block, same pass
        other.attach_cache(FeatureCache(tmp_path, other.backbone_id))
        again = cached(images)
        block2 = other(images)
    assert cached.cache.hits >= 2 and other.cache.hits == 2 and other.cache.misses == 0
    for k in want:
        assert torch.equal(first[k], want[k]) and torch.equal(again[k], want[k])
    torch.testing.assert_close(block2["block2"], VitExtractor(NAME, [2], pretrained=False)(
        images)["block2"], rtol=0, atol=0)


def test_cnn_keys_on_a_vit_and_blocks_on_a_cnn_are_refused():
    vit = {"name": NAME, "kind": "vit", "pretrained": False}
    with pytest.raises(ConfigError, match=r"layers\.layer2=1 selects a CNN stage"):
        build_extractor(vit, {"layer2": 1, "blocks": [3]}, seed=0)
    with pytest.raises(ConfigError, match="12 transformer blocks"):
        build_extractor(vit, {"blocks": [12]}, seed=0)
    with pytest.raises(ConfigError, match="is a CNN"):
        build_extractor({"name": "resnet18", "pretrained": False}, {"layer2": -1, "blocks": [1]},
                        seed=0)


def test_class_tokens_beside_the_maps_where_the_model_has_one():
    ext = VitExtractor(NAME, [2, -1], pretrained=False, seed=0)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    m = ext.model
    with torch.no_grad():
        feats = ext(images)
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
        ref = {}
        for i, block in enumerate(m.blocks):
            x = block(x)
            ref[f"block{i}"] = x[:, 0]
    assert ext.has_class_token and list(feats.class_tokens) == ["block2", "block11"]
    for k, v in feats.class_tokens.items():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-5)
