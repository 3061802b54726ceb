"""SPADE and zero-shot texture kNN against straightforward references on the same features."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from anomaly_bench.errors import ConfigError
from anomaly_bench.methods import build_method, load_fitted_state
from anomaly_bench.types import Batch

BACKBONE = {"name": "resnet18", "hub_tag": "tv_in1k", "pretrained": False, "weights": None}


def _batch(images):
    n = images.shape[0]
    return Batch(images=images, labels=torch.zeros(n, dtype=torch.long),
                 paths=[str(i) for i in range(n)], defect_types=["good"] * n)


def _blur(maps):
    return np.stack([gaussian_filter(m, 4, mode="mirror", truncate=4.0) for m in maps])


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(7, 3, 64, 64, generator=gen), torch.randn(2, 3, 64, 64, generator=gen)


SPADE_LAYERS = {"layer1": -1, "layer2": -1, "layer3": -1, "layer4": -1}


def _spade_reference(model, train, test, k, kappa, galleries=None):
    """Scores and maps of SPADE written plainly: float64 distances to every training image
    and every gallery position, full sorts. ``galleries`` (B, K) replaces the K nearest."""
    with torch.inference_mode():
        ftr, fte = model.extractor(train), model.extractor(test)
    g_tr = ftr["layer4"].mean((2, 3)).double()
    g_te = fte["layer4"].mean((2, 3)).double()
    scores, maps = [], []
    for i in range(test.shape[0]):
        d = ((g_tr - g_te[i]) ** 2).sum(1)  # squared distances to every training image
        near = d.argsort()[:k]
        scores.append(float(d[near].mean()))
        gal = near if galleries is None else galleries[i]
        layer_maps = []
        for s in ("layer1", "layer2", "layer3"):
            g = ftr[s][gal].double().permute(0, 2, 3, 1).reshape(-1, ftr[s].shape[1])
            q = fte[s][i].double().permute(1, 2, 0).reshape(-1, ftr[s].shape[1])
            dd = torch.cdist(q, g).square().sort(1).values[:, :kappa].mean(1)
            m = dd.view(1, 1, *fte[s].shape[-2:])
            layer_maps.append(F.interpolate(m, size=test.shape[-2:], mode="bilinear",
                                            align_corners=False)[0, 0])
        maps.append(torch.stack(layer_maps).mean(0).numpy())
    return np.array(scores), _blur(np.stack(maps))


def test_spade_equals_reference(data):
    train, test = data
    model = build_method({"name": "spade", "k": 3, "kappa": 2}, BACKBONE, SPADE_LAYERS, seed=0)
    model.fit([_batch(train[:4]), _batch(train[4:])])
    pred = model.predict(_batch(test))
    scores, maps = _spade_reference(model, train, test, 3, 2)
    np.testing.assert_allclose(pred.image_scores.double().numpy(), scores, rtol=1e-4)
    np.testing.assert_allclose(pred.anomaly_maps.double().numpy(), maps, rtol=1e-4, atol=1e-4)
    fresh = build_method({"name": "spade", "k": 3, "kappa": 2}, BACKBONE, SPADE_LAYERS, seed=0)
    load_fitted_state(fresh, model.state_dict(), "memory")
    assert torch.equal(fresh.predict(_batch(test)).anomaly_maps, pred.anomaly_maps)


@pytest.mark.parametrize("k", [3, 7])  # a gallery per test image; the whole training set
def test_spade_screened_pixel_search_equals_reference(data, monkeypatch, k):
    """kappa = 1 through the bfloat16-screened search (forced on, whatever the CPU)."""
    from anomaly_bench.methods import spade

    monkeypatch.setattr(spade, "screen_available", lambda: True)
    monkeypatch.setattr(spade, "_SCREEN_PAIRS", 0)
    train, test = data
    model = build_method({"name": "spade", "k": k}, BACKBONE, SPADE_LAYERS, seed=0)
    model.fit([_batch(train[:4]), _batch(train[4:])])
    assert all(model._screen(s) is not None for s in ("layer1", "layer2", "layer3"))
    pred = model.predict(_batch(test))
    scores, maps = _spade_reference(model, train, test, k, 1)
    np.testing.assert_allclose(pred.image_scores.double().numpy(), scores, rtol=1e-4)
    np.testing.assert_allclose(pred.anomaly_maps.double().numpy(), maps, rtol=1e-5, atol=1e-6)
    # a checkpoint's banks get their own screens, with the same maps
    fresh = build_method({"name": "spade", "k": k}, BACKBONE, SPADE_LAYERS, seed=0)
    load_fitted_state(fresh, model.state_dict(), "memory")
    torch.testing.assert_close(fresh.predict(_batch(test)).anomaly_maps, pred.anomaly_maps)


def test_spade_checkpoint_loaded_into_a_fitted_model(data, monkeypatch):
    """Loading copies into the fitted banks in place: the screened searches follow."""
    from anomaly_bench.methods import spade

    monkeypatch.setattr(spade, "screen_available", lambda: True)
    monkeypatch.setattr(spade, "_SCREEN_PAIRS", 0)
    train, test = data
    source = build_method({"name": "spade", "k": 7}, BACKBONE, SPADE_LAYERS, seed=0)
    target = build_method({"name": "spade", "k": 7}, BACKBONE, SPADE_LAYERS, seed=0)
    source.fit([_batch(train)])
    target.fit([_batch(train.flip(0) * 0.5)])
    before = target.predict(_batch(test)).anomaly_maps
    load_fitted_state(target, source.state_dict(), "memory")
    after = target.predict(_batch(test)).anomaly_maps
    torch.testing.assert_close(after, source.predict(_batch(test)).anomaly_maps)
    assert not torch.allclose(after, before)


def test_spade_random_gallery(data):
    """gallery=random: K training images drawn per test image from the run seed; the
    image score is still the retrieval's."""
    train, test = data
    cfg = {"name": "spade", "k": 3, "gallery": "random"}
    model = build_method(cfg, BACKBONE, SPADE_LAYERS, seed=5)
    model.fit([_batch(train)])
    pred = model.predict(_batch(test))
    draws = torch.rand(2, 7, generator=torch.Generator().manual_seed(5)).argsort(1)[:, :3]
    scores, maps = _spade_reference(model, train, test, 3, 1, galleries=draws)
    np.testing.assert_allclose(pred.image_scores.double().numpy(), scores, rtol=1e-4)
    np.testing.assert_allclose(pred.anomaly_maps.double().numpy(), maps, rtol=1e-4, atol=1e-4)
    _, nearest_maps = _spade_reference(model, train, test, 3, 1)
    assert np.abs(maps - nearest_maps).max() > 1e-3  # the draw is not the retrieval
    again = build_method(cfg, BACKBONE, SPADE_LAYERS, seed=5)
    again.fit([_batch(train)])
    assert torch.equal(again.predict(_batch(test)).anomaly_maps, pred.anomaly_maps)
    other = build_method(cfg, BACKBONE, SPADE_LAYERS, seed=6)
    other.fit([_batch(train)])
    assert not torch.equal(other.predict(_batch(test)).anomaly_maps, pred.anomaly_maps)


def test_spade_default_preprocessing_is_the_papers():
    """256 px resize and 224 px centre crop: pixel maps of 56/28/14 with WideResNet50-2."""
    from fixtures import compose_config

    cfg = compose_config(["method=spade"])
    assert (cfg.resolution.size, cfg.resolution.crop) == (256, 224)
    assert cfg.method.gallery == "nearest"
    with pytest.raises(ConfigError, match="gallery"):
        build_method({"name": "spade", "gallery": "far"}, BACKBONE, SPADE_LAYERS, seed=0)


def test_spade_global_layer_is_a_selected_feature_or_the_deepest():
    """``global_layer: null`` (the YAML default) is the deepest selected feature: layer4
    with SPADE's layers, as the paper; a name must be one of the selected features."""
    model = build_method({"name": "spade"}, BACKBONE, SPADE_LAYERS, seed=0)
    assert model.global_layer == "layer4"
    assert model.pixel_layers == ["layer1", "layer2", "layer3"]
    layers = {"layer1": -1, "layer2": -1, "layer3": -1, "layer4": None}
    shallower = build_method({"name": "spade"}, BACKBONE, layers, seed=0)
    assert shallower.global_layer == "layer3" and shallower.pixel_layers == ["layer1", "layer2"]
    with pytest.raises(ConfigError, match=r"method.global_layer='layer4'.*layer1, layer2, "
                                          r"layer3.*null for the deepest \(layer3\)"):
        build_method({"name": "spade", "global_layer": "layer4"}, BACKBONE, layers, seed=0)
    one = build_method({"name": "spade", "pixel_layers": "layer2"}, BACKBONE, SPADE_LAYERS,
                       seed=0)
    assert one.pixel_layers == ["layer2"]  # a single name is one feature, not its letters
    with pytest.raises(ConfigError, match="pixel_layers"):
        build_method({"name": "spade", "pixel_layers": ["layer5"]}, BACKBONE, SPADE_LAYERS,
                     seed=0)


TEX_LAYERS = {"layer1": None, "layer2": -1, "layer3": None, "layer4": None}


def _texture_reference(model, images, k, border):
    with torch.inference_mode():
        f = F.avg_pool2d(model.extractor(images)["layer2"], 3, 1, 1).double()
    b, _, h, w = f.shape
    x = f.flatten(2).transpose(1, 2)
    scores = np.zeros((b, h * w))
    for i in range(b):
        for p in range(h * w):  # every patch against every other patch of its image
            d = (x[i] - x[i, p]).norm(dim=1)
            d[p] = float("inf")
            scores[i, p] = float(d.sort().values[:k].mean())
    up = F.interpolate(torch.from_numpy(scores).view(b, 1, h, w), size=images.shape[-2:],
                       mode="bilinear", align_corners=False)[:, 0].numpy()
    maps = _blur(up)
    e = border
    return maps[:, e:-e, e:-e].reshape(b, -1).max(1), maps


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_texture_zero_shot_equals_reference(data, impl):
    _, test = data
    model = build_method({"name": "texture_knn", "k": 5, "border": 8, "impl": impl},
                         BACKBONE, TEX_LAYERS, seed=0)
    assert model.zero_shot
    model.fit([])  # zero-shot: nothing to learn
    pred = model.predict(_batch(test))
    ref_scores, ref_maps = _texture_reference(model, test, 5, 8)
    np.testing.assert_allclose(pred.anomaly_maps.double().numpy(), ref_maps, rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(pred.image_scores.double().numpy(), ref_scores, rtol=1e-4)


def test_texture_many_shot_uses_training_patches(data):
    train, test = data
    model = build_method({"name": "texture_knn", "mode": "many_shot", "k": 3, "border": 0},
                         BACKBONE, TEX_LAYERS, seed=0)
    assert not model.zero_shot
    model.fit([_batch(train)])
    with torch.inference_mode():
        feats = lambda im: F.avg_pool2d(model.extractor(im)["layer2"], 3, 1, 1)  # noqa: E731
        bank = feats(train).permute(0, 2, 3, 1).reshape(-1, 128).double()
        q = feats(test).permute(0, 2, 3, 1).reshape(2, -1, 128).double()
    s = torch.stack([torch.cdist(q[i], bank).sort(1).values[:, :3].mean(1) for i in range(2)])
    up = F.interpolate(s.view(2, 1, 8, 8), size=(64, 64), mode="bilinear",
                       align_corners=False)[:, 0].numpy()
    maps = _blur(up)
    np.testing.assert_allclose(pred_maps := model.predict(_batch(test)).anomaly_maps.double()
                               .numpy(), maps, rtol=1e-4, atol=1e-4)
    assert pred_maps.shape == (2, 64, 64)
