"""Trainable backbones and masked sequences: ``forward_kept`` on timm ViTs / MAE."""

from __future__ import annotations

import pytest
import torch

from anomaly_bench.backbones.cache import FeatureCache
from anomaly_bench.backbones.vit import VitExtractor
from anomaly_bench.errors import ConfigError
from anomaly_bench.methods.common import build_extractor

NAME = "vit_tiny_patch16_224"


def _images(b: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(1))


def _one_sequence(model, image: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Reference: one image, one sequence, built token by token from timm's modules."""
    x = model._pos_embed(model.patch_embed(image[None]))[0]  # (1 + N, C)
    seq = torch.stack([x[0], *[x[1 + i] for i in keep]])[None]
    return model.norm(model.blocks(seq))[0]


def test_all_patches_kept_is_the_plain_forward():
    ext = VitExtractor(NAME, [-1], pretrained=False, seed=0)
    images = _images()
    keep = torch.arange(16).expand(2, 1, 16)
    with torch.no_grad():
        out = ext.forward_kept(images, keep)
        ref = ext.model.forward_features(images)
    assert out.shape == (2, 1, 17, 192)
    torch.testing.assert_close(out[:, 0], ref, atol=1e-5, rtol=1e-5)


def test_kept_tokens_keep_their_positions_in_several_sequences():
    ext = VitExtractor(NAME, [-1], pretrained=False, seed=0)
    images = _images()
    g = torch.Generator().manual_seed(3)
    keep = torch.stack([torch.stack([torch.randperm(16, generator=g)[:5] for _ in range(3)])
                        for _ in range(2)])  # (B=2, S=3, K=5)
    with torch.no_grad():
        out = ext.forward_kept(images, keep)
        for b in range(2):
            for s in range(3):
                ref = _one_sequence(ext.model, images[b], keep[b, s].tolist())
                torch.testing.assert_close(out[b, s], ref, atol=1e-5, rtol=1e-5)
    # the kept set, not its order, decides the tokens (positions travel with them)
    with torch.no_grad():
        flipped = ext.forward_kept(images, keep.flip(-1))
    torch.testing.assert_close(flipped[:, :, 1:], out[:, :, 1:].flip(2), atol=1e-5, rtol=1e-5)


def test_trainable_backbone_takes_gradients_and_follows_train_mode():
    frozen = VitExtractor(NAME, [-1], pretrained=False, seed=0)
    trained = VitExtractor(NAME, [-1], pretrained=False, seed=0, trainable=True)
    assert trained.model is not frozen.model  # a private copy, never the shared network
    assert not any(p.requires_grad for p in frozen.parameters())
    trained.train()
    frozen.train()
    assert trained.training and not frozen.training
    keep = torch.arange(8)[None, None].expand(2, 1, 8)
    trained.forward_kept(_images(), keep).square().mean().backward()
    assert trained.model.blocks[0].attn.qkv.weight.grad is not None
    assert frozen.forward_kept(_images(), keep).grad_fn is None


def test_trainable_backbone_never_uses_the_feature_cache(tmp_path):
    ext = VitExtractor(NAME, [-1], pretrained=False, seed=0, trainable=True)
    with pytest.raises(ConfigError, match="cannot come from the feature cache"):
        ext.attach_cache(FeatureCache(tmp_path, ext.backbone_id))
    cfg = {"name": NAME, "kind": "vit", "pretrained": False,
           "cache": {"enabled": True, "dir": str(tmp_path), "max_gb": 1}}
    with pytest.raises(ConfigError, match=r"backbone\.cache\.enabled=false"):
        build_extractor(cfg, {"blocks": [-1]}, 0, trainable=True)


def test_only_vits_are_built_trainable():
    with pytest.raises(ConfigError, match="trained backbones are timm ViTs"):
        build_extractor({"name": "resnet18", "kind": "cnn", "pretrained": False},
                        {"layer1": -1}, 0, trainable=True)
