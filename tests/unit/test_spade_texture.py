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


def test_spade_equals_reference(data):
    train, test = data
    layers = {"layer1": -1, "layer2": -1, "layer3": -1, "layer4": -1}
    model = build_method({"name": "spade", "k": 3, "kappa": 2}, BACKBONE, layers, seed=0)
    model.fit([_batch(train[:4]), _batch(train[4:])])
    pred = model.predict(_batch(test))
    with torch.inference_mode():
        ftr, fte = model.extractor(train), model.extractor(test)
    g_tr = ftr["layer4"].mean((2, 3)).double()
    g_te = fte["layer4"].mean((2, 3)).double()
    scores, maps = [], []
    for i in range(2):
        d = ((g_tr - g_te[i]) ** 2).sum(1)  # squared distances to every training image
        near = d.argsort()[:3]
        scores.append(float(d[near].mean()))
        layer_maps = []
        for s in ("layer1", "layer2", "layer3"):
            gal = ftr[s][near].double().permute(0, 2, 3, 1).reshape(-1, ftr[s].shape[1])
            q = fte[s][i].double().permute(1, 2, 0).reshape(-1, ftr[s].shape[1])
            dd = torch.cdist(q, gal).square().sort(1).values[:, :2].mean(1)
            m = dd.view(1, 1, *fte[s].shape[-2:])
            layer_maps.append(F.interpolate(m, size=(64, 64), mode="bilinear",
                                            align_corners=False)[0, 0])
        maps.append(torch.stack(layer_maps).mean(0).numpy())
    np.testing.assert_allclose(pred.image_scores.double().numpy(), scores, rtol=1e-4)
    np.testing.assert_allclose(pred.anomaly_maps.double().numpy(), _blur(np.stack(maps)),
                               rtol=1e-4, atol=1e-4)
    fresh = build_method({"name": "spade", "k": 3, "kappa": 2}, BACKBONE, layers, seed=0)
    load_fitted_state(fresh, model.state_dict(), "memory")
    assert torch.equal(fresh.predict(_batch(test)).anomaly_maps, pred.anomaly_maps)


def test_spade_needs_its_global_layer():
    layers = {"layer1": -1, "layer2": -1, "layer3": -1, "layer4": None}
    with pytest.raises(ConfigError, match="global_layer"):
        build_method({"name": "spade"}, BACKBONE, layers, seed=0)


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
