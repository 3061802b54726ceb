"""PaDiM against a straightforward per-position NumPy/SciPy reference on the same features."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import mahalanobis

from anomaly_bench.methods import build_method
from anomaly_bench.methods.common import build_extractor
from anomaly_bench.methods.padim import Padim
from anomaly_bench.types import Batch

BACKBONE = {"name": "resnet18", "hub_tag": "tv_in1k", "pretrained": False, "weights": None}
LAYERS = {"layer1": -1, "layer2": -1, "layer3": -1, "layer4": None}


def _batch(images):
    n = images.shape[0]
    return Batch(images=images, labels=torch.zeros(n, dtype=torch.long),
                 paths=[str(i) for i in range(n)], defect_types=["good"] * n)


def _fit(solver: str, n_features: int = 40):
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(24, 3, 64, 64, generator=gen)
    test = torch.randn(3, 3, 64, 64, generator=gen)
    model = build_method({"name": "padim", "n_features": n_features, "reg": 0.01,
                          "blur_sigma": 4.0, "solver": solver}, BACKBONE, LAYERS, seed=0)
    model.fit([_batch(train[i : i + 5]) for i in range(0, 24, 5)])
    return model, train, test


@pytest.fixture(scope="module")
def fitted():
    return _fit("auto")  # 24 samples < 40 channels: the low-rank (Woodbury) solver


def reference_padim(model: Padim, train: torch.Tensor, test: torch.Tensor):
    """The paper's algorithm written plainly: loops over positions, NumPy/SciPy maths."""

    whole = build_extractor(BACKBONE, LAYERS, seed=0)  # every channel, as the paper reads

    def embedding(x):
        feats = whole(x)
        l1 = feats["layer1"]
        up = [F.interpolate(f, size=l1.shape[-2:], mode="nearest") for f in feats.values()]
        emb = torch.cat(up, 1)[:, model.channel_idx]
        return emb.double().numpy()

    with torch.inference_mode():
        tr, te = embedding(train), embedding(test)
    n, c, h, w = tr.shape
    tr, te = tr.reshape(n, c, h * w), te.reshape(te.shape[0], c, h * w)
    dist = np.zeros((te.shape[0], h * w))
    for p in range(h * w):
        mu = tr[:, :, p].mean(0)
        cov = np.cov(tr[:, :, p], rowvar=False) + 0.01 * np.eye(c)
        icov = np.linalg.inv(cov)
        for b in range(te.shape[0]):
            dist[b, p] = mahalanobis(te[b, :, p], mu, icov)
    dist = torch.from_numpy(dist.reshape(-1, 1, h, w))
    up = F.interpolate(dist, size=test.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    maps = np.stack([gaussian_filter(m, 4, mode="mirror", truncate=4.0) for m in up.numpy()])
    return maps.reshape(len(maps), -1).max(1), maps


def test_padim_matches_reference(fitted):
    model, train, test = fitted
    pred = model.predict(_batch(test))
    ref_scores, ref_maps = reference_padim(model, train, test)
    np.testing.assert_allclose(pred.anomaly_maps.double().numpy(), ref_maps, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pred.image_scores.double().numpy(), ref_scores, rtol=1e-4)


@pytest.mark.parametrize(("solver", "n_features"), [("full", 40), ("lowrank", 40), ("auto", 12)])
def test_every_solver_matches_reference(solver, n_features):
    model, train, test = _fit(solver, n_features)
    ref_scores, ref_maps = reference_padim(model, train, test)
    pred = model.predict(_batch(test))
    np.testing.assert_allclose(pred.anomaly_maps.double().numpy(), ref_maps, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pred.image_scores.double().numpy(), ref_scores, rtol=1e-4)
    # auto with 24 samples > 12 channels switches to streaming: the full solver's buffers
    assert (model.inv_cov is not None) == (solver == "full" or n_features < 24)


def test_padim_shapes_and_paper_dims(fitted):
    model, _, test = fitted
    # low-rank statistics per block on its own grid: 16x16, 8x8, 4x4 cells
    chans = [model.widths[s] for s in ("layer1", "layer2", "layer3")]
    assert sum(chans) == 40
    for stage, c, cells in zip(("layer1", "layer2", "layer3"), chans, (256, 64, 16), strict=True):
        assert model.get_buffer(f"mean_{stage}").shape == (cells, c)
        assert model.get_buffer(f"centred_{stage}").shape == (cells, 24, c)
    assert model.whiten.shape == (256, 24, 24) and model.mean is None
    pred = model.predict(_batch(test))
    assert pred.anomaly_maps.shape == (3, 64, 64) and pred.image_scores.shape == (3,)
    paper = build_method({"name": "padim", "n_features": None}, BACKBONE, LAYERS, seed=0)
    assert paper.channel_idx.numel() == 100  # ResNet18: d = 100 as in the paper


def test_channel_subset_is_seeded():
    a = build_method({"name": "padim", "n_features": 30}, BACKBONE, LAYERS, seed=1)
    b = build_method({"name": "padim", "n_features": 30}, BACKBONE, LAYERS, seed=1)
    c = build_method({"name": "padim", "n_features": 30}, BACKBONE, LAYERS, seed=2)
    assert torch.equal(a.channel_idx, b.channel_idx)
    assert not torch.equal(a.channel_idx, c.channel_idx)


def test_state_dict_round_trip_gives_identical_scores(fitted):
    from anomaly_bench.methods import load_fitted_state

    model, _, test = fitted
    fresh = build_method({"name": "padim", "n_features": 40}, BACKBONE, LAYERS, seed=0)
    load_fitted_state(fresh, model.state_dict(), "memory")
    assert torch.equal(fresh.predict(_batch(test)).image_scores,
                       model.predict(_batch(test)).image_scores)


def test_pyramid_channel_selection_equals_select_after_concat():
    from anomaly_bench.methods.common import concat_pyramid

    gen = torch.Generator().manual_seed(0)
    feats = {"a": torch.randn(2, 4, 8, 8, generator=gen),
             "b": torch.randn(2, 6, 4, 4, generator=gen),
             "c": torch.randn(2, 5, 3, 3, generator=gen)}  # 8/3 is no integer factor
    full = torch.cat([feats["a"]] + [F.interpolate(feats[k], size=(8, 8), mode="nearest")
                                     for k in ("b", "c")], 1)
    idx = torch.tensor([0, 3, 4, 9, 11, 14])
    assert torch.equal(concat_pyramid(feats), full)
    assert torch.equal(concat_pyramid(feats, idx), full[:, idx])


def test_memo_bytes_are_the_shares_the_lowrank_solver_derives(fitted):
    """``memory_cache_gb=auto`` sizes a sweep's memo with ``memo_bytes``: per stage the
    training statistics (mean, centred samples, Gram matrices) and the test images'
    cross terms, exactly the float64 tensors the solver derives and memoises."""
    from anomaly_bench.memo import nbytes
    from anomaly_bench.ops.gaussian import level_cross, level_stats

    model, train, test = fitted
    with torch.inference_mode():
        tr, te = model._features(train), model._features(test)
        derived = 0
        for a, b in zip(model._chosen(tr), model._chosen(te), strict=True):
            mean, centred, gram = level_stats([a.value])
            derived += nbytes((mean, centred, gram)) + nbytes(level_cross(b.value, mean, centred))
    shapes = {s: tuple(tr[s].shape[1:]) for s in model.stages}
    assert model.memo_bytes(len(train), len(test), shapes) == derived
