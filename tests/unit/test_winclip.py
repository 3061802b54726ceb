"""WinCLIP against a plain float64 implementation of the published computation.

The reference below is written from the description of what anomalib 2.7's WinCLIP
computes (reference-facts), with every window embedded on its own: loops over windows,
over patches and over memory rows, the tower run in float64. Ours runs in float32 on a
random tiny open_clip model; the tolerances follow from float32 arithmetic (see
``_bound``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures import compose_config, register_tiny_clip
from omegaconf import OmegaConf

from anomaly_bench.data.source import TrainSource
from anomaly_bench.errors import ConfigError
from anomaly_bench.methods import MethodContext, build_method
from anomaly_bench.methods.winclip import window_indices
from anomaly_bench.types import Batch, SampleRecord

GRID = 4  # the tiny CLIP: 64 px, 16 px patches


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return register_tiny_clip(tmp_path_factory.mktemp("clip_configs"))


def _config(tiny: str, **method) -> tuple[dict, dict, dict]:
    cfg = OmegaConf.to_container(compose_config(["method=winclip"]).method, resolve=True)
    backbone = {"name": tiny, "kind": "clip", "hub_tag": None, "pretrained": False,
                "weights": None, "image_size": None}
    return {**cfg, **method}, backbone, {"blocks": [-1]}


def _images(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _source(images: torch.Tensor) -> TrainSource:
    records = [SampleRecord(Path(f"{i}.png"), 0) for i in range(len(images))]

    def batches(recs, what):
        idx = [int(r.image_path.stem) for r in recs]
        yield Batch(images=images[idx], labels=torch.zeros(len(idx), dtype=torch.long),
                    paths=[str(r.image_path) for r in recs], defect_types=["good"] * len(idx))

    return TrainSource(records, batches, seed=0)


def _context(refs: TrainSource | None) -> MethodContext:
    return MethodContext(dataset="synthetic", category="metal_nut", class_name="metal nut",
                         references=refs, device=torch.device("cpu"), seed=0,
                         out_dir=Path("unused"), resume=False)


def _bound(model) -> float:
    """A bound on how far float32 embeddings (unit vectors) of the tower may be from the
    exact ones: each block's four products reduce over at most 4 * width terms, each
    with an error of at most n u (u = 2^-24), carried by every later block."""
    visual = model.visual
    return len(visual.transformer.resblocks) * 4 * (4 * visual.transformer.width) * 2.0**-24


# ---------------------------------------------------------------------- the reference
def reference(model, tokenizer, images, refs, prompts, temperature=0.07, scales=(2, 3)):
    """Image scores and 64 x 64 maps as published, plainly, in float64."""
    model = copy.deepcopy(model).double()
    visual = model.visual
    images = images.double()

    def text(states):
        sentences = [t.format(s.format("metal nut")) for s in states
                     for t in prompts["templates"]]
        return model.encode_text(tokenizer(sentences)).mean(0)

    txt = F.normalize(torch.stack([text(prompts["normal_states"]),
                                   text(prompts["anomalous_states"])]), dim=-1)

    def prob(f):  # anomalous probability of one embedding
        return ((F.normalize(f, dim=-1) @ txt.T) / temperature).softmax(-1)[1]

    def encode(image):
        x = visual._embeds(image[None])  # class + patches, positions, ln_pre
        out = visual.ln_post(visual.transformer(x))[0]
        emb = out[0] @ visual.proj
        patches = out[1:]
        windows = {}
        for k in scales:
            for r in range(GRID - k + 1):
                for c in range(GRID - k + 1):
                    idx = [1 + (r + i) * GRID + (c + j) for i in range(k) for j in range(k)]
                    seq = torch.cat([x[:, :1], x[:, idx]], dim=1)  # this window alone
                    windows[(k, r, c)] = visual.ln_post(visual.transformer(seq))[0, 0] \
                        @ visual.proj
        return emb, patches, windows

    def harmonic(scores, k):  # per patch, over the windows covering it
        out = torch.zeros(GRID, GRID, dtype=torch.float64)
        for i in range(GRID):
            for j in range(GRID):
                cover = [scores[(k, r, c)] for (kk, r, c) in scores if kk == k
                         and r <= i < r + k and c <= j < c + k]
                out[i, j] = len(cover) / sum(1 / s for s in cover)
        return out

    def dist(f, memory):  # min over the memory of (1 - cos) / 2
        return min((1 - F.cosine_similarity(f, m, dim=0)) / 2 for m in memory)

    memory = [encode(r) for r in refs.double()] if refs is not None else []
    scores, maps = [], []
    for image in images:
        emb, patches, windows = encode(image)
        p = prob(emb)
        wp = {key: prob(w) for key, w in windows.items()}
        parts = [p.expand(GRID, GRID), *(harmonic(wp, k) for k in scales)]
        zero = len(parts) / sum(1 / m for m in parts)
        score, final = p, zero
        if memory:
            patch = torch.stack([dist(t, [m for _, mp, _ in memory for m in mp])
                                 for t in patches]).view(GRID, GRID)
            few = [patch]
            for k in scales:
                wd = {key: dist(w, [mw[key2] for _, _, mw in memory for key2 in mw
                                    if key2[0] == k])
                      for key, w in windows.items() if key[0] == k}
                few.append(harmonic(wd, k))
            few_map = torch.stack(few).mean(0)
            final = (zero + few_map) / 2
            score = (p + few_map.max()) / 2
        scores.append(score)
        maps.append(F.interpolate(final[None, None], size=(64, 64), mode="bilinear",
                                  align_corners=False)[0, 0])
    return torch.stack(scores), torch.stack(maps)


@pytest.mark.parametrize("k_shot", [0, 1, 2, 4])
def test_scores_and_maps_equal_the_published_computation(tiny, k_shot):
    import open_clip

    method_cfg, backbone, layers = _config(tiny, k_shot=k_shot)
    model = build_method(method_cfg, backbone, layers, seed=0).eval()
    refs = _images(7, 4)
    source = _source(refs).choose(k_shot) if k_shot else None
    model.setup(_context(source))
    test = _images(3, 2)
    pred = model.predict(Batch(images=test, labels=torch.zeros(2, dtype=torch.long),
                               paths=["a", "b"], defect_types=["good", "good"]))
    chosen = torch.cat([b.images for b in source]) if source is not None else None
    want_scores, want_maps = reference(model.extractor.model, open_clip.get_tokenizer(tiny),
                                       test, chosen, method_cfg["prompts"])
    assert pred.anomaly_maps.shape == (2, 64, 64) and pred.image_scores.shape == (2,)
    # a softmax of cosine / T moves by at most 2 e / (4 T) for embeddings off by e; the
    # harmonic and arithmetic means and the bilinear upsampling do not widen that
    tol = 2 * _bound(model.extractor.model) / (4 * method_cfg["temperature"])
    torch.testing.assert_close(pred.image_scores.double(), want_scores, rtol=0, atol=tol)
    torch.testing.assert_close(pred.anomaly_maps.double(), want_maps, rtol=0, atol=tol)
    # each window has its own embedding: the zero-shot map is not flat within an image
    spread = want_maps.flatten(1).amax(1) - want_maps.flatten(1).amin(1)
    assert (spread > 10 * tol).all()


def test_a_reference_equal_to_the_test_image_makes_its_few_shot_scores_zero(tiny):
    method_cfg, backbone, layers = _config(tiny, k_shot=1)
    model = build_method(method_cfg, backbone, layers, seed=0).eval()
    image = _images(11, 1)
    batch = Batch(images=image, labels=torch.zeros(1, dtype=torch.long), paths=["a"],
                  defect_types=["good"])
    model.setup(_context(None))
    zero = model.predict(batch)
    model.setup(_context(_source(image).choose(1)))
    few = model.predict(batch)
    # few-shot map 0 everywhere: the final map is half the zero-shot map, the image
    # score half the zero-shot score
    tol = 4 * _bound(model.extractor.model)
    torch.testing.assert_close(few.anomaly_maps, zero.anomaly_maps / 2, rtol=0, atol=tol)
    torch.testing.assert_close(few.image_scores, zero.image_scores / 2, rtol=0, atol=tol)


def test_prompts_take_the_class_name_of_the_context(tiny):
    method_cfg, backbone, layers = _config(tiny)
    model = build_method(method_cfg, backbone, layers, seed=0)
    prompts = method_cfg["prompts"]
    assert (len(prompts["normal_states"]), len(prompts["anomalous_states"]),
            len(prompts["templates"]), len(set(prompts["templates"]))) == (7, 4, 21, 21)
    model.setup(_context(None))
    screw = model.text_embeddings("screw")
    assert torch.equal(model.text, model.text_embeddings("metal nut"))
    assert not torch.allclose(model.text, screw)
    torch.testing.assert_close(model.text.norm(dim=-1), torch.ones(2))


def test_windows_are_row_major_and_cover_the_grid():
    got = window_indices((4, 5), 2)
    want = [[r * 5 + c, r * 5 + c + 1, (r + 1) * 5 + c, (r + 1) * 5 + c + 1]
            for r in range(3) for c in range(4)]
    assert got.tolist() == want
    assert window_indices((15, 15), 3).shape == (169, 9)
    with pytest.raises(ConfigError, match="must fit"):
        window_indices((4, 4), 5)


def test_other_backbone_kinds_and_bad_settings_are_refused(tiny):
    method_cfg, backbone, layers = _config(tiny)
    with pytest.raises(ConfigError, match="choose a CLIP backbone"):
        build_method(method_cfg, {"name": "resnet18", "pretrained": False}, layers, seed=0)
    with pytest.raises(ConfigError, match="selects a CNN stage"):
        build_method(method_cfg, backbone, {"layer3": 2, "blocks": [-1]}, seed=0)
    with pytest.raises(ConfigError, match=r"method\.scales"):
        build_method({**method_cfg, "scales": [2, "x"]}, backbone, layers, seed=0)
    bad = {**method_cfg["prompts"], "templates": ["a photo"]}
    with pytest.raises(ConfigError, match="templates holds 'a photo'"):
        build_method({**method_cfg, "prompts": bad}, backbone, layers, seed=0)


def test_patch_blocks_are_the_selected_ones_and_the_last_block_always_runs(tiny):
    method_cfg, backbone, _ = _config(tiny)
    model = build_method(method_cfg, backbone, {"blocks": [0]}, seed=0)
    assert model.patch_blocks == ["block0"] and model.layers_tag == "blocks.0+blocks.2"
