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


# ---------------------------------------------------------------------- class tokens, windows
def _bound(bb: ClipBackbone) -> float:
    """How far two float32 evaluations of the same tower may differ when their products
    sum in other orders (other batch shapes, other kernels): each block's four products
    (qkv, attention out, MLP in, MLP out) reduce over at most 4 * width terms, with an
    error of at most n u per reduction of n terms (u = 2^-24), carried by every later
    block; the joint-space embeddings compared are unit vectors."""
    visual = bb.model.visual
    return len(visual.transformer.resblocks) * 4 * (4 * visual.transformer.width) * 2.0**-24


def _windows(grid: int, size: int) -> torch.Tensor:
    """(S, size*size) row-major patch indices of every size x size window at stride 1."""
    idx = torch.arange(grid * grid).view(grid, grid)
    return torch.stack([idx[r:r + size, c:c + size].reshape(-1)
                        for r in range(grid - size + 1) for c in range(grid - size + 1)])


def test_class_tokens_of_every_block_and_the_image_embedding(tiny):
    bb = ClipBackbone(tiny, [0, -1], pretrained=False, seed=0)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = bb(images)
        x = bb.model.visual._embeds(images)
        ref = {}
        for i, block in enumerate(bb.model.visual.transformer.resblocks):
            x = block(x)
            ref[f"block{i}"] = x[:, 0]
        image = bb.encode_image(images)
    assert list(feats.class_tokens) == ["block0", "block2"]
    for k, v in feats.class_tokens.items():
        assert v.shape == (2, 48)
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-5)
    # the last block's class token through ln_post and the projection is CLIP's embedding
    torch.testing.assert_close(bb.embed_class_tokens(feats.class_tokens["block2"]), image,
                               rtol=0, atol=_bound(bb))


def test_class_tokens_come_through_the_feature_cache(tiny, tmp_path):
    from anomaly_bench.backbones.cache import FeatureCache, flush_writes
    from anomaly_bench.memo import MEMO

    budget = MEMO.budget
    MEMO.configure(0)  # every cached read goes to the disk
    try:
        plain = ClipBackbone(tiny, [1, 2], pretrained=False, seed=0)
        images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        cached = ClipBackbone(tiny, [1, 2], pretrained=False, seed=0)
        cached.attach_cache(FeatureCache(tmp_path, cached.backbone_id))
        with torch.no_grad():
            want = plain(images)
            first = cached(images)
            flush_writes()
            other = ClipBackbone(tiny, [0], pretrained=False, seed=0)  # an earlier block
            other.attach_cache(FeatureCache(tmp_path, other.backbone_id))
            again, block0 = cached(images), other(images)
    finally:
        MEMO.configure(budget)
    assert other.cache.hits == 2 and other.cache.misses == 0
    for got in (first, again):
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert all(torch.equal(got.class_tokens[k], want.class_tokens[k]) for k in want)
    assert torch.equal(block0.class_tokens["block0"],
                       ClipBackbone(tiny, [0], pretrained=False)(images).class_tokens["block0"])


def test_cache_key_names_everything_that_changes_the_tokens(tiny):
    import open_clip

    ids = {ClipBackbone(tiny, [-1], pretrained=False, seed=0).backbone_id,
           ClipBackbone(tiny, [-1], pretrained=False, seed=1).backbone_id,
           ClipBackbone(tiny, [-1], pretrained=False, seed=0, image_size=96).backbone_id}
    assert len(ids) == 3
    assert all(f"open_clip={open_clip.__version__}" in i for i in ids)


def test_each_window_is_its_own_sequence_through_the_tower(tiny):
    """A window's embedding is the class token and the window's patch tokens (with their
    position embeddings) alone through ln_pre, the blocks, ln_post and the projection:
    the batched pass equals a plain loop over windows, windows over other content or
    other positions differ, and the window of all patches is the image's embedding."""
    bb = ClipBackbone(tiny, [-1], pretrained=False, seed=0)
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 64, 64, generator=gen)
    tol = _bound(bb)
    visual = bb.model.visual
    for size in (2, 3):
        keep = _windows(4, size).expand(2, -1, -1)
        with torch.no_grad():
            got = bb.encode_windows(images, keep)
            x = visual._embeds(images)
            loop = torch.stack([torch.stack([
                bb._joint(visual.ln_post(visual.transformer(
                    torch.cat([x[b, :1], x[b, 1:][w]])[None]))[0, 0]) for w in keep[b]])
                for b in range(2)])
        assert got.shape == (2, keep.shape[1], 32)
        torch.testing.assert_close(got, loop, rtol=0, atol=tol)
        far = 1 - (got[0] @ got[0].T)  # cosine distances between the windows of an image
        assert far[~torch.eye(len(far), dtype=torch.bool)].min() > 100 * tol
    # identical content at every position: windows still differ, by position alone
    tiled = images[:1, :, :16, :16].repeat(1, 1, 4, 4)
    with torch.no_grad():
        same = bb.encode_windows(tiled, _windows(4, 2)[None])
        whole = bb.encode_windows(images, torch.arange(16).expand(2, 1, 16))[:, 0]
    assert (1 - same[0] @ same[0].T).max() > 10 * tol
    torch.testing.assert_close(whole, bb.encode_image(images), rtol=0, atol=tol)


def test_windows_in_chunks_equal_windows_in_one_pass(tiny, monkeypatch):
    from anomaly_bench.backbones import clip

    bb = ClipBackbone(tiny, [-1], pretrained=False, seed=0)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    keep = _windows(4, 3).expand(3, -1, -1)
    with torch.no_grad():
        one, windows = bb.forward_kept(images, keep), bb.encode_windows(images, keep)
        monkeypatch.setattr(clip, "CHUNK_TOKENS", 25)  # 2 sequences of 10 tokens per chunk
        chunked, chunked_windows = bb.forward_kept(images, keep), bb.encode_windows(images, keep)
    assert one.shape == (3, 4, 10, 48) and windows.shape == (3, 4, 32)
    torch.testing.assert_close(chunked, one, rtol=0, atol=_bound(bb))
    torch.testing.assert_close(chunked_windows, windows, rtol=0, atol=_bound(bb))
    # the class-token-only last block gives the class token of the full pass
    torch.testing.assert_close(windows, bb._joint(one[:, :, 0]), rtol=0, atol=_bound(bb))


def test_local_weights_of_another_size_are_interpolated_as_the_hub_path(tiny, tmp_path):
    """A state dict saved at 64 px (4 x 4 patches) loaded at 96 px (6 x 6): the class
    token's position embedding kept, the patch grid resampled bicubically with
    antialiasing (the official APRIL-GAN code for 336 -> 518 px), every other parameter
    as saved; open_clip's own loading of the same file at 96 px gives the same model."""
    import open_clip
    import torch.nn.functional as F

    donor = ClipBackbone(tiny, [-1], pretrained=False, seed=5).model
    path = tmp_path / "tiny_64px.pt"
    torch.save(donor.state_dict(), path)
    bb = ClipBackbone(tiny, [-1], pretrained=False, weights=str(path), image_size=96)
    assert bb.fixed_size == 96 and bb.weights_tag.startswith("file:tiny_64px.pt#")
    old = donor.visual.positional_embedding
    grid = old[1:].reshape(1, 4, 4, 48).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True,
                         align_corners=False).permute(0, 2, 3, 1).reshape(36, 48)
    new = bb.model.visual.positional_embedding
    assert new.shape == (37, 48) and torch.equal(new[0], old[0])
    torch.testing.assert_close(new[1:], want, rtol=0, atol=0)
    saved = donor.state_dict()
    for k, v in bb.model.state_dict().items():
        if k != "visual.positional_embedding":
            assert torch.equal(v, saved[k]), k
    hub = open_clip.create_model(tiny, pretrained=str(path), force_image_size=96)
    assert torch.equal(hub.visual.positional_embedding, new)


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
