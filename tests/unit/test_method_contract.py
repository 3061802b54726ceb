"""One contract every registered method keeps, on every backbone kind it can use.

The runner's lifecycle (setup with the fitting context -> fit on the images of the
learning setting -> setup with the tested category's context and few-shot references ->
predict) gives one finite score per image and a map at the image size; the fitted state
survives a checkpoint (the frozen backbone left out) and the restored method scores
identically; the frozen backbone is never part of what is saved.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures import compose_config, register_tiny_clip
from omegaconf import OmegaConf

from anomaly_bench import checkpoint
from anomaly_bench.data.source import TrainSource
from anomaly_bench.footprint import feature_shapes
from anomaly_bench.methods import (
    LEARNING,
    AnomalyMethod,
    MethodContext,
    available,
    build_method,
)
from anomaly_bench.types import Batch, SampleRecord

BACKBONE = {"name": "resnet18", "hub_tag": "tv_in1k", "pretrained": False, "weights": None,
            "truncate": True, "cache": {"enabled": False, "dir": "unused"}}
VIT = {"name": "vit_tiny_patch16_224", "kind": "vit", "hub_tag": None, "pretrained": False,
       "weights": None, "weights_url": None, "mean": None, "std": None, "truncate": True,
       "cache": {"enabled": False, "dir": "unused"}}
CLIP = {"name": "Tiny-CLIP-test", "kind": "clip", "hub_tag": None, "pretrained": False,
        "weights": None, "image_size": None, "truncate": True,
        "cache": {"enabled": False, "dir": "unused"}}
#: Blocks of the transformer per method (texture kNN reads one block).
VIT_LAYERS = {"padim": [3, 6, 9], "patchcore": [6, 9], "texture_knn": [4], "spade": [3, 6, 9]}
CLIP_LAYERS = {"padim": [0, 1, 2], "patchcore": [1, 2], "spade": [0, 1, 2], "aprilgan": [1, 2],
               "winclip": [1]}
#: Small-data settings (the published K of 50 or 400 neighbours needs more images).
SMALL = {"spade": {"k": 3}, "texture_knn": {"k": 8, "border": 4},
         "patchcore": {"coreset_ratio": 0.5}}
#: Methods that need a CLIP backbone (their YAML selects one): run on the tiny CLIP only.
CLIP_ONLY = {m for m in available()
             if compose_config([f"method={m}"]).backbone.get("kind") == "clip"}
#: The backbone kind a method is tested on when it cannot take a CNN (MMR trains a ViT
#: encoder, the CLIP methods need a CLIP tower), and the overrides that make it small
#: (one epoch, a ResNet-18 teacher).
KIND = {"mmr": "vit", **{m: "clip" for m in CLIP_ONLY}}
OVERRIDES = {"mmr": ["method.teacher=resnet18", "method.epochs=1", "backbone.pretrained=false"]}


def _batches(records: list[SampleRecord], what: str):
    """Seeded random images; an anomalous record gets a square defect in its mask."""
    for i in range(0, len(records), 4):
        chunk = records[i : i + 4]
        images = torch.stack([torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(
            int(r.image_path.stem))) for r in chunk])
        masks = torch.zeros(len(chunk), 1, 64, 64)
        labels = torch.tensor([r.label for r in chunk], dtype=torch.long)
        masks[labels == 1, :, 16:32, 24:40] = 1
        yield Batch(images=images, labels=labels, paths=[str(r.image_path) for r in chunk],
                    defect_types=["crack" if r.label else "good" for r in chunk], masks=masks,
                    categories=[r.category for r in chunk])


def _configs(method: str, extra: dict | None, kind: str) -> tuple[dict, dict, dict]:
    cfg = compose_config([f"method={method}", *OVERRIDES.get(method, [])])
    method_cfg = {**OmegaConf.to_container(cfg.method, resolve=True), **SMALL.get(method, {}),
                  **(extra or {})}
    if kind == "vit":
        return method_cfg, VIT, {"blocks": VIT_LAYERS.get(method, [-1])}
    if kind == "clip":
        return method_cfg, CLIP, {"blocks": CLIP_LAYERS[method]}
    return method_cfg, BACKBONE, OmegaConf.to_container(cfg.layers)


def _fitted(method: str, tmp_path: Path, extra: dict | None, kind: str) -> AnomalyMethod:
    method_cfg, backbone, layers = _configs(method, extra, kind)
    model = build_method(method_cfg, backbone, layers, seed=0)
    normal = [SampleRecord(Path(f"{i}.png"), 0, category="metal_nut") for i in range(8)]
    annotated = [SampleRecord(Path(f"{50 + i}.png"), i % 2, category="metal_nut")
                 for i in range(8)]
    fit_records = {"one_class": normal, "zero_shot": [], "auxiliary": annotated}
    source = TrainSource(fit_records[model.learning], _batches, seed=0)
    context = {"dataset": "synthetic", "category": "metal_nut", "class_name": "metal nut",
               "device": torch.device("cpu"), "seed": 0, "out_dir": tmp_path, "resume": False,
               "class_names": {"metal_nut": "metal nut"}}
    model.setup(MethodContext(references=None, **context))
    model.fit(source)
    refs = TrainSource(normal, _batches, seed=0).choose(model.k_shot) if model.k_shot else None
    model.setup(MethodContext(references=refs, **context))
    return model.eval()


def _test_batch() -> Batch:
    return next(_batches([SampleRecord(Path(f"{100 + i}.png"), 0) for i in range(3)], "test"))


CASES = ([(m, None, KIND.get(m, "cnn")) for m in available() if m not in CLIP_ONLY]
         + [("texture_knn", {"mode": "many_shot"}, "cnn")]
         + [(m, None, "vit") for m in VIT_LAYERS] + [(m, None, "clip") for m in CLIP_LAYERS]
         + [("winclip", {"k_shot": 2}, "clip")])


@pytest.fixture(scope="module", autouse=True)
def tiny_clip(tmp_path_factory) -> str:
    return register_tiny_clip(tmp_path_factory.mktemp("clip_configs"))


@pytest.mark.parametrize(("method", "extra", "kind"), CASES,
                         ids=[f"{m}-{k}" if e is None else f"{m}-{next(iter(e.values()))}-{k}"
                              for m, e, k in CASES])
def test_method_contract(method, extra, kind, tmp_path):
    model = _fitted(method, tmp_path, extra, kind)
    assert model.context.class_name == "metal nut" and model.learning in LEARNING
    batch = _test_batch()
    pred = model.predict(batch)
    assert pred.image_scores.shape == (3,) and pred.anomaly_maps.shape == (3, 64, 64)
    assert torch.isfinite(pred.image_scores).all() and torch.isfinite(pred.anomaly_maps).all()
    assert model.predict(batch).image_scores.equal(pred.image_scores)  # deterministic

    fitted = model.fitted_state()
    assert not any(k.startswith("extractor.") for k in fitted)
    method_cfg, backbone, layers = _configs(method, extra, kind)
    config = {"method": method_cfg, "backbone": backbone, "layers": layers,
              "resolution": {"size": 64, "crop": None}, "alignment": {"name": "none"}}
    meta = {"method": method, "backbone": backbone["name"], "weights": model.weights_tag,
            "layers": model.layers_tag, "resolution": "64", "dataset": "synthetic",
            "category": "metal_nut", "seed": 0}
    path = checkpoint.save(tmp_path / "model.pt", model, config, meta)
    payload = checkpoint.load(path)
    restored = checkpoint.restore(payload, path, backbone, payload["config"]["method"]).eval()
    restored.setup(model.context)  # as the runner does before each tested category
    again = restored.predict(batch)
    assert torch.equal(again.image_scores, pred.image_scores)
    assert torch.equal(again.anomaly_maps, pred.anomaly_maps)


@pytest.mark.parametrize("method", available())
def test_blur_border_reaches_the_maps(method, tmp_path):
    """``method.blur_border`` changes the maps near the image border only: ``reflect``
    (scipy.ndimage's default) repeats the edge pixel, ``mirror`` (the default but for MMR,
    whose official code blurs with scipy) does not. (A method whose maps are unblurred by
    default is given the blur of the others.)"""
    kind = KIND.get(method, "cnn")
    sigma = {"blur_sigma": 4.0}
    model = _fitted(method, tmp_path, sigma, kind)
    default = model.blur_border
    other = "reflect" if default == "mirror" else "mirror"
    method_cfg, backbone, layers = _configs(method, {"blur_border": other, **sigma}, kind)
    assert build_method(method_cfg, backbone, layers, seed=0).blur_border == other
    assert default == ("reflect" if method == "mmr" else "mirror")
    batch = _test_batch()
    maps = {default: model.predict(batch).anomaly_maps}
    model.blur_border = other
    maps[other] = model.predict(batch).anomaly_maps
    mirror, reflect = maps["mirror"], maps["reflect"]
    r = int(4 * model.blur_sigma + 0.5)
    inner = (slice(None), slice(r, -r), slice(r, -r))
    torch.testing.assert_close(reflect[inner], mirror[inner])
    assert not torch.allclose(reflect, mirror)


@pytest.mark.parametrize(("kind", "names"), [("vit", ["block3", "block6", "block9"]),
                                             ("clip", ["block0", "block1", "block2"])])
def test_spade_on_a_transformer_names_its_blocks(kind, names):
    """SPADE's layers are the extractor's feature names: on a transformer the global
    feature defaults to the deepest selected block, and a CNN stage name is refused with
    the names that are allowed."""
    from anomaly_bench.errors import ConfigError

    method_cfg, backbone, layers = _configs("spade", None, kind)
    model = build_method(method_cfg, backbone, layers, seed=0)
    assert model.global_layer == names[-1] and model.pixel_layers == names[:-1]
    chosen = build_method({**method_cfg, "global_layer": names[0], "pixel_layers": names[1:2]},
                          backbone, layers, seed=0)
    assert chosen.global_layer == names[0] and chosen.pixel_layers == names[1:2]
    with pytest.raises(ConfigError, match=rf"global_layer='layer4'.*{', '.join(names)}"):
        build_method({**method_cfg, "global_layer": "layer4"}, backbone, layers, seed=0)


@pytest.mark.parametrize(("method", "extra"), [
    ("padim", None), ("padim", {"solver": "full"}), ("patchcore", {"coreset_ratio": 1.0}),
    ("spade", None), ("texture_knn", {"mode": "many_shot"}), ("texture_knn", None)])
def test_fit_bytes_is_a_lower_bound_of_what_fitting_holds(method, extra, tmp_path):
    """The memory check's estimate (fit_bytes, from shapes alone) never exceeds what the
    fitted statistics or bank hold, and is not far below it."""
    model = _fitted(method, tmp_path, extra, "cnn")
    ext = model.extractor
    estimate = model.fit_bytes(8, feature_shapes(ext.channels, ext.strides, (64, 64)))
    held = sum(t.numel() * t.element_size() for t in model.fitted_state().values())
    assert held // 3 <= estimate <= held, (estimate, held)
