"""open_clip backbones: patch-token maps of the image tower, text and image embeddings."""

from __future__ import annotations

import pytest
import torch
from fixtures import register_tiny_clip

from anomaly_bench.backbones import weights as weights_module
from anomaly_bench.backbones.clip import ClipBackbone
from anomaly_bench.errors import ConfigError, WeightsError
from anomaly_bench.methods.common import build_extractor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return register_tiny_clip(tmp_path_factory.mktemp("clip_configs"))


def test_blocks_are_patch_token_grids_of_the_image_tower(tiny):
    bb = ClipBackbone(tiny, [0, -1], pretrained=False, seed=0)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = bb(images)
        x = bb.model.visual._embeds(images)  # the tower step by step
        ref = {}
        for i, block in enumerate(bb.model.visual.transformer.resblocks):
            x = block(x)
            ref[f"block{i}"] = x[:, 1:].reshape(2, 4, 4, 48).permute(0, 3, 1, 2)
    assert list(feats) == ["block0", "block2"] and bb.tag == "blocks.0+blocks.2"
    assert bb.channels == {"block0": 48, "block2": 48} and bb.strides["block2"] == 16
    for k, v in feats.items():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-5)
    assert bb.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # CLIP's statistics
    assert bb.fixed_size == 64 and bb.weights_tag == "random(seed=0)"


def test_text_and_image_embeddings_are_normalised(tiny):
    bb = ClipBackbone(tiny, [-1], pretrained=False, seed=0)
    text = bb.encode_text(["a photo of a flawless screw", "a photo of a damaged screw"])
    image = bb.encode_image(torch.zeros(3, 3, 64, 64))
    assert text.shape == (2, 32) and image.shape == (3, 32)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(text[0], text[1])
    again = ClipBackbone(tiny, [-1], pretrained=False, seed=0).encode_text(["a photo"])
    other = ClipBackbone(tiny, [-1], pretrained=False, seed=1).encode_text(["a photo"])
    assert torch.equal(again, bb.encode_text(["a photo"])) and not torch.equal(again, other)


def test_other_input_sizes_and_cnn_keys_are_refused(tiny):
    bb = ClipBackbone(tiny, [-1], pretrained=False)
    with pytest.raises(ConfigError, match="takes 64 px images"):
        bb(torch.zeros(1, 3, 96, 96))
    with pytest.raises(ConfigError, match="has 3 transformer blocks"):
        ClipBackbone(tiny, [3], pretrained=False)
    cfg = {"name": tiny, "kind": "clip", "pretrained": False}
    with pytest.raises(ConfigError, match="selects a CNN stage"):
        build_extractor(cfg, {"layer3": -1, "blocks": [1]}, seed=0)
    sized = build_extractor({**cfg, "image_size": 96}, {"blocks": [1]}, seed=0)
    assert sized.fixed_size == 96 and sized(torch.zeros(1, 3, 96, 96))["block1"].shape == (
        1, 48, 6, 6)


def test_unreachable_hub_fails_fast_with_offline_options(tiny, monkeypatch):
    probes = []
    monkeypatch.setattr(weights_module, "_host_reachable",
                        lambda url, timeout=weights_module.PROBE_TIMEOUT_S: probes.append(url))
    monkeypatch.setattr(weights_module, "hub_cached", lambda hf_id: False)
    with pytest.raises(WeightsError) as err:
        ClipBackbone("ViT-B-16-plus-240", [-1], hub_tag="laion400m_e31", pretrained=True)
    assert len(probes) == 1
    assert "backbone.weights=PATH" in str(err.value)
    assert "backbone.pretrained=false" in str(err.value)


def test_one_pass_gives_the_block_maps_and_the_image_embedding(tiny):
    """features_and_embedding = calling the backbone + encode_image, from one pass."""
    bb = ClipBackbone(tiny, [0, 1], pretrained=False, seed=0)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    feats, embedding = bb.features_and_embedding(images)
    plain = bb(images)
    assert list(feats) == list(plain) == ["block0", "block1"]
    for k in plain:
        torch.testing.assert_close(feats[k], plain[k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embedding, bb.encode_image(images), rtol=1e-5, atol=1e-5)
    assert bb.embed_dim == embedding.shape[1] == 32 and bb.n_blocks == 3


def test_quick_gelu_is_the_activation_and_part_of_the_weights_tag(tiny):
    from open_clip.transformer import QuickGELU

    from anomaly_bench.backbones.weights import weights_tag

    gelu = ClipBackbone(tiny, [-1], pretrained=False, seed=0)
    quick = ClipBackbone(tiny, [-1], pretrained=False, seed=0, quick_gelu=True)
    act = [type(m) for m in quick.model.visual.transformer.resblocks[0].mlp.children()]
    assert QuickGELU in act
    assert QuickGELU not in [type(m) for m in gelu.model.visual.transformer.resblocks[0].mlp
                             .children()]
    assert (gelu.weights_tag, quick.weights_tag) == ("random(seed=0)",
                                                     "random(seed=0)+quick_gelu")
    assert quick.weights_tag == weights_tag(tiny, None, False, None, 0, kind="clip",
                                            quick_gelu=True)  # what a run requests
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(gelu(images)["block2"], quick(images)["block2"])
    assert gelu.backbone_id != quick.backbone_id  # cached features are kept apart
