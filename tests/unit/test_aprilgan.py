"""APRIL-GAN against a plain step-by-step reading of what the official code computes.

The reference below walks open_clip's image tower block by block (raw residual tokens,
no ``ln_post``), builds the prompt ensemble prompt by prompt, upsamples both logit
channels and takes the softmax, forms the few-shot memory and its cosine distances
explicitly, and writes the official focal and dice losses term by term: the method's
shortcuts (one upsampled channel, one upsampling of the summed few-shot maps, a single
pass for maps and image embedding) must give the same numbers to float32 rounding.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures import compose_config, register_tiny_clip
from omegaconf import OmegaConf

from anomaly_bench.data.source import TrainSource
from anomaly_bench.errors import ConfigError
from anomaly_bench.methods import MethodContext, build_method
from anomaly_bench.methods.aprilgan import dice_loss, focal_loss, prompt_sentences
from anomaly_bench.types import Batch, SampleRecord

SIZE = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return register_tiny_clip(tmp_path_factory.mktemp("clip_configs"))


def _method(tiny: str, short: bool = True, **extra):
    """The method on the tiny CLIP; ``short``: 3 of the 35 templates (the tokenizer is the
    slow part of a setup; the ensemble's maths are the same)."""
    cfg = OmegaConf.to_container(compose_config(["method=aprilgan"]).method, resolve=True)
    if short:
        cfg["prompts"]["templates"] = cfg["prompts"]["templates"][:3]
    backbone = {"name": tiny, "kind": "clip", "pretrained": False, "weights": None,
                "image_size": None, "quick_gelu": False}
    model = build_method({**cfg, **extra}, backbone, {"blocks": [0, 2]}, seed=0)
    with torch.no_grad():  # trained-looking adapters: away from the seeded initialisation
        for p in model.adapters.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    return model.eval()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _batches_of(images: dict[str, torch.Tensor]):
    def batches(records: list[SampleRecord], what: str):
        for i in range(0, len(records), 2):
            chunk = records[i:i + 2]
            masks = torch.zeros(len(chunk), 1, SIZE, SIZE)
            for j, r in enumerate(chunk):
                if r.label:
                    masks[j, :, 8:24, 16:40] = 1
            yield Batch(images=torch.stack([images[str(r.image_path)] for r in chunk]),
                        labels=torch.tensor([r.label for r in chunk]),
                        paths=[str(r.image_path) for r in chunk],
                        defect_types=[r.defect_type for r in chunk], masks=masks,
                        categories=[r.category for r in chunk])
    return batches


def _context(tmp_path: Path, refs=None, names=None) -> MethodContext:
    return MethodContext(dataset="synthetic", category="metal_nut", class_name="metal nut",
                         references=refs, device=torch.device("cpu"), seed=0,
                         out_dir=tmp_path, resume=False,
                         class_names=names or {"metal_nut": "metal nut"})


# ---------------------------------------------------------------------- the reference
def _ref_text(model, name: str) -> torch.Tensor:
    clip = model.extractor.model
    tok = model.extractor._tokenizer
    out = []
    for states in model.states:
        sentences = [t.format(s.format(name)) for s in states for t in model.templates]
        emb = clip.encode_text(tok(sentences))
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(dim=0)
        out.append(mean / mean.norm())
    return torch.stack(out, dim=1)


def _ref_tokens(model, images: torch.Tensor):
    """Raw tokens after every block (class token first) and the image embedding."""
    visual = model.extractor.model.visual
    x = visual._embeds(images)
    per_block = []
    for block in visual.transformer.resblocks:
        x = block(x)
        per_block.append(x)
    pooled = visual.ln_post(x[:, 0]) @ visual.proj
    return per_block, pooled / pooled.norm(dim=-1, keepdim=True)


@torch.no_grad()
def _reference(model, images: torch.Tensor, text: torch.Tensor, memory=None):
    """(image scores, maps) as the official test.py computes them, image by image."""
    blocks, image_features = _ref_tokens(model, images)
    scores, maps = [], []
    for i in range(len(images)):
        probs = (100.0 * image_features[i:i + 1] @ text).softmax(dim=-1)
        scores.append(probs[0, 1])
        total = torch.zeros(1, SIZE, SIZE)
        for adapter, b in zip(model.adapters, (0, 2), strict=True):
            t = adapter(blocks[b][i:i + 1, 1:, :])
            t = t / t.norm(dim=-1, keepdim=True)
            amap = 100.0 * t @ text  # (1, L, 2)
            h = int(amap.shape[1] ** 0.5)
            amap = F.interpolate(amap.permute(0, 2, 1).reshape(1, 2, h, h), size=SIZE,
                                 mode="bilinear", align_corners=True)
            total = total + torch.softmax(amap, dim=1)[:, 1]
        if memory is not None:
            for b in (0, 2):
                p = blocks[b][i, 1:, :]
                mem = memory[b]
                cos = (mem / mem.norm(dim=-1, keepdim=True)) @ (p / p.norm(dim=-1,
                                                                          keepdim=True)).T
                few = (1 - cos).min(dim=0).values.reshape(1, 1, h, h)
                total = total + F.interpolate(few, size=SIZE, mode="bilinear",
                                              align_corners=True)[0]
        maps.append(total[0])
    return torch.stack(scores), torch.stack(maps)


# ---------------------------------------------------------------------- tests
def test_the_prompt_ensemble_is_every_state_in_every_template(tiny):
    model = _method(tiny, short=False)
    assert [len(s) for s in model.states] == [7, 5] and len(model.templates) == 35
    sentences = prompt_sentences("metal_nut", model.states[1], model.templates)
    assert len(sentences) == 175 and sentences[0] == "a bad photo of a damaged metal_nut."
    assert sentences[35] == "a bad photo of a broken metal_nut."  # state-major, as official
    assert len(prompt_sentences("x", model.states[0], model.templates)) == 245


def test_zero_shot_maps_and_scores_equal_the_reference(tiny, tmp_path):
    model = _method(tiny, short=False)
    model.setup(_context(tmp_path))
    text = _ref_text(model, "metal_nut")  # the category's name as it is, as meta.json has it
    torch.testing.assert_close(model.text["metal_nut"], text, rtol=1e-5, atol=1e-6)
    images = _images(3, 0)
    pred = model.predict(Batch(images=images, labels=torch.zeros(3, dtype=torch.long),
                               paths=["a", "b", "c"], defect_types=["good"] * 3))
    scores, maps = _reference(model, images, text)
    assert pred.anomaly_maps.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(pred.image_scores, scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(pred.anomaly_maps, maps, rtol=0, atol=1e-5)
    assert model.finish(pred).image_scores.equal(pred.image_scores)  # zero-shot: per image
    assert 0.1 < float(maps.std()) and float(maps.max()) <= 2  # two blocks: range 0-2


def test_class_names_words_prompts_the_layouts_words(tiny, tmp_path):
    model = _method(tiny, class_names="words")
    model.setup(_context(tmp_path))
    torch.testing.assert_close(model.text["metal_nut"], _ref_text(model, "metal nut"),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_few_shot_adds_the_memory_map_and_the_official_image_score(tiny, tmp_path, k):
    refs_images = {f"r{i}": _images(1, 100 + i)[0] for i in range(5)}
    records = [SampleRecord(Path(f"r{i}"), 0, category="metal_nut") for i in range(5)]
    refs = TrainSource(records, _batches_of(refs_images), seed=0).choose(k)
    model = _method(tiny, k_shot=k)
    model.k_shot = k
    model.setup(_context(tmp_path, refs))
    chosen = torch.stack([refs_images[str(r.image_path)] for r in refs.train_records])
    blocks, _ = _ref_tokens(model, chosen)
    memory = {b: blocks[b][:, 1:, :].reshape(-1, blocks[b].shape[-1]) for b in (0, 2)}
    assert model.memory["block0"].shape == (k * 16, 48)
    images = _images(4, 1)
    parts = [model.predict(Batch(images=images[i:i + 2], labels=torch.zeros(2),
                                 paths=["x", "y"], defect_types=["good"] * 2))
             for i in (0, 2)]
    from anomaly_bench.types import Prediction

    joined = Prediction(torch.cat([p.image_scores for p in parts]),
                        torch.cat([p.anomaly_maps for p in parts]),
                        {key: torch.cat([p.extras[key] for p in parts])
                         for key in parts[0].extras})
    final = model.finish(joined)
    p, maps = _reference(model, images, _ref_text(model, "metal_nut"), memory)
    torch.testing.assert_close(final.anomaly_maps, maps, rtol=0, atol=2e-5)
    top = maps.flatten(1).amax(1)
    official = 0.5 * (p + (top - top.min()) / (top.max() - top.min()))
    torch.testing.assert_close(final.image_scores, official, rtol=0, atol=2e-5)
    # per_image: the same maps; each score is computed from its own image only
    model.image_score = "per_image"
    alone = model.predict(Batch(images=images[:1], labels=torch.zeros(1), paths=["x"],
                                defect_types=["good"]))
    torch.testing.assert_close(alone.image_scores[0], 0.5 * (p[0] + top[0] / 4), rtol=0,
                               atol=2e-5)
    assert model.finish(alone).image_scores.equal(alone.image_scores)


def _official_focal(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official FocalLoss (alpha None, gamma 2, smooth 1e-5) on (B, 2, H, W) probs."""
    logit = probs.permute(0, 2, 3, 1).reshape(-1, 2)
    idx = target.reshape(-1, 1).long()
    one_hot = torch.zeros(len(idx), 2).scatter_(1, idx, 1).clamp(1e-5, 1 - 1e-5)
    pt = (one_hot * logit).sum(1) + 1e-5
    return (-1 * torch.pow(1 - pt, 2) * pt.log()).mean()


def _official_dice(p1: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    n = target.size()[0]
    i, t = p1.reshape(n, -1), target.reshape(n, -1)
    dice = (2 * (i * t).sum(1) + 1) / (i.sum(1) + t.sum(1) + 1)
    return 1 - dice.sum() / n


def test_training_loss_is_focal_plus_dice_summed_over_blocks(tiny, tmp_path):
    model = _method(tiny)
    model.setup(_context(tmp_path))
    images = _images(2, 3)
    masks = torch.zeros(2, 1, SIZE, SIZE)
    masks[1, :, 10:30, 20:50] = 1
    batch = Batch(images=images, labels=torch.tensor([0, 1]), paths=["a", "b"],
                  defect_types=["good", "crack"], masks=masks,
                  categories=["metal_nut", "metal_nut"])
    loss = model.training_step(batch)
    blocks, _ = _ref_tokens(model, images)
    text = _ref_text(model, "metal_nut")
    expected = torch.zeros(())
    for adapter, b in zip(model.adapters, (0, 2), strict=True):
        t = adapter(blocks[b][:, 1:, :])
        t = t / t.norm(dim=-1, keepdim=True)
        amap = (100.0 * t @ text).permute(0, 2, 1).reshape(2, 2, 4, 4)
        probs = torch.softmax(F.interpolate(amap, size=SIZE, mode="bilinear",
                                            align_corners=True), dim=1)
        expected = expected + _official_focal(probs, masks[:, 0])
        expected = expected + _official_dice(probs[:, 1], masks[:, 0])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # a batch of one: the official code squeezes it to (H, W), and its dice loss becomes
    # a mean over the rows; ours stays the loss of the one image
    p1 = torch.rand(1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    one = masks[1:, 0]
    assert dice_loss(p1, one) == pytest.approx(float(_official_dice(p1, one)))
    squeezed = _official_dice(p1, one.squeeze())
    assert abs(float(squeezed) - float(dice_loss(p1, one))) > 0.05
    assert focal_loss(1 - p1, p1, one) == pytest.approx(
        float(_official_focal(torch.stack([1 - p1, p1], 1), one)), rel=1e-6)


def test_the_loss_decreases_on_a_fixed_batch(tiny, tmp_path):
    model = _method(tiny)
    model.setup(_context(tmp_path))
    masks = torch.zeros(2, 1, SIZE, SIZE)
    masks[:, :, 16:48, 16:48] = 1
    batch = Batch(images=_images(2, 4), labels=torch.ones(2, dtype=torch.long),
                  paths=["a", "b"], defect_types=["crack"] * 2, masks=masks,
                  categories=["metal_nut"] * 2)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3, betas=(0.5, 0.999))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model.training_step(batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert all(p.grad is None for p in model.extractor.parameters())  # only the adapters


def test_stitching_replaces_images_by_mosaics_of_their_category(tiny, tmp_path):
    images = {f"{c}{i}": _images(1, 10 * n + i)[0] for n, c in enumerate("ab")
              for i in range(4)}
    records = [SampleRecord(Path(f"{c}{i}"), i % 2, "crack" if i % 2 else "good",
                            category={"a": "metal_nut", "b": "screw"}[c])
               for c in "ab" for i in range(4)]
    source = TrainSource(records, _batches_of(images), seed=0)
    model = _method(tiny, stitch_rate=1.0)
    model._pool = source
    batch = next(iter(source))
    out = model.augment(batch, torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 3, SIZE, SIZE) and out.masks.shape == (2, 1, SIZE, SIZE)
    half = SIZE // 2
    quads = [out.images[0, :, :half, :half], out.images[0, :, :half, half:],
             out.images[0, :, half:, :half], out.images[0, :, half:, half:]]
    small = {k: F.interpolate(v[None], size=(half, half), mode="bicubic", antialias=True)[0]
             for k, v in images.items()}
    for q in quads:  # every quadrant is one image of the first image's category, resized
        best = min(small, key=lambda k: float((small[k] - q).abs().max()))
        assert best.startswith("a") and torch.allclose(small[best], q, atol=1e-5)
    assert set(out.masks.unique().tolist()) <= {0.0, 1.0}
    again = model.augment(next(iter(source)), torch.Generator().manual_seed(0))
    assert torch.equal(again.images, out.images)  # the epoch's generator decides
    model.stitch_rate = 0.0
    plain = next(iter(source))
    assert model.augment(plain, torch.Generator()).images is plain.images


def test_a_cnn_backbone_or_bad_blocks_are_refused_before_any_image(tiny):
    cfg = OmegaConf.to_container(compose_config(["method=aprilgan"]).method, resolve=True)
    cnn = {"name": "resnet18", "pretrained": False, "weights": None}
    with pytest.raises(ConfigError, match=r"needs a CLIP backbone.*resnet18"):
        build_method(cfg, cnn, {"layer3": -1}, seed=0)
    clip = {"name": tiny, "kind": "clip", "pretrained": False, "weights": None}
    with pytest.raises(ConfigError, match="has 3 transformer blocks"):
        build_method(cfg, clip, {"blocks": [5, 11, 17, 23]}, seed=0)
    with pytest.raises(ConfigError, match="selects a CNN stage"):
        build_method(cfg, clip, {"blocks": [1], "layer2": 0}, seed=0)
    with pytest.raises(ConfigError, match="memory_blocks"):
        build_method({**cfg, "memory_blocks": ["last"]}, clip, {"blocks": [1]}, seed=0)
