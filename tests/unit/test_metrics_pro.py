"""PRO curve / AUPRO against a slow per-threshold NumPy reference, by hand and edge cases."""

from bisect import bisect_right
from itertools import pairwise

import numpy as np
import pytest
import torch
from scipy import ndimage

from anomaly_bench.metrics import aupro, label_regions, pro_curve


def _reference_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Obviously correct PRO curve: one pass over the pixels per distinct threshold."""
    regions = []  # one boolean (H, W) mask per 8-connected region, with its image index
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3), dtype=int))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:  # every distinct score, highest first
        pred = maps >= t
        fprs.append((pred & normal).sum() / normal.sum())
        pros.append(np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions]))
    fprs.append(1.0)
    pros.append(1.0)
    return np.minimum(fprs, 1.0), np.minimum(pros, 1.0)


def _reference_area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoids up to x_max, with y interpolated linearly at x_max (official script)."""
    ins = bisect_right(list(x), x_max)
    xs, ys = list(x[:ins]), list(y[:ins])
    if ins < len(x) and xs[-1] < x_max:
        ys.append(y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1]))
        xs.append(x_max)
    return float(np.trapezoid(ys, xs))


def _reference_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    return _reference_area(*_reference_curve(maps, masks), limit) / limit


def _random_case(seed: int, n: int = 6, size: int = 32, decimals: int | None = 2):
    """Maps (optionally rounded, so scores tie) and masks of rectangles and blobs.

    Image 0 holds two diagonally touching pixels that 8-connectivity must merge; image 1
    is defect-free.
    """
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(2, n):
        for _ in range(rng.integers(1, 4)):
            if rng.random() < 0.5:
                y0, x0 = rng.integers(0, size - 4, 2)
                h, w = rng.integers(1, 8, 2)
                masks[i, y0 : y0 + h, x0 : x0 + w] = True
            else:
                cy, cx = rng.random(2) * size
                r = 1 + rng.random() * 5
                masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    masks[0, 5, 5] = masks[0, 6, 6] = True
    maps = rng.random(masks.shape) * 0.7 + 0.4 * masks * rng.random((n, 1, 1))
    if decimals is not None:
        maps = np.round(maps, decimals)
    return maps, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_aupro_matches_reference_with_ties(seed, dtype):
    """float32 maps on the CPU take the packed-key sort, float64 ones torch.sort."""
    maps, masks = _random_case(seed)
    m = torch.from_numpy(maps).to(dtype)
    got = aupro(m, torch.from_numpy(masks))
    assert got == pytest.approx(_reference_aupro(m.double().numpy(), masks), abs=1e-6)


@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_reference_distinct_scores(limit):
    maps, masks = _random_case(7, n=4, size=16, decimals=None)
    got = aupro(torch.from_numpy(maps), torch.from_numpy(masks), fpr_limit=limit)
    assert got == pytest.approx(_reference_aupro(maps, masks, limit), abs=1e-6)


def test_pro_curve_is_the_reference_polyline_at_its_corners():
    """pro_curve keeps the reference's points where the curve turns; every point it drops
    lies inside a flat run between two kept points (same PRO, FPR between)."""
    for seed, decimals in ((3, 2), (4, 1), (12, None)):
        maps, masks = _random_case(seed, decimals=decimals)
        fpr, pro = (t.numpy() for t in pro_curve(torch.from_numpy(maps), torch.from_numpy(masks)))
        ref_fpr, ref_pro = _reference_curve(maps, masks)
        # with few distinct scores every one can be a corner; with distinct ones few are
        assert len(fpr) < len(ref_fpr) / 3 if decimals is None else len(fpr) <= len(ref_fpr)
        same = (np.abs(fpr[:, None] - ref_fpr[None]) < 1e-12) \
            & (np.abs(pro[:, None] - ref_pro[None]) < 1e-12)
        kept = [-1]  # each point is the first reference point after the previous one's
        for row in same:
            kept.append(kept[-1] + 1 + int(np.argmax(row[kept[-1] + 1:])))
            assert row[kept[-1]]
        kept = kept[1:]
        assert kept[0] == 0 and kept[-1] == len(ref_fpr) - 1
        for a, b in pairwise(kept):
            if b > a + 1:  # the points dropped between a and b: a flat run they bound
                np.testing.assert_allclose(ref_pro[a:b + 1], ref_pro[a], rtol=0, atol=1e-12)
        for limit in (0.3, 0.05, 1.0):
            assert _reference_area(fpr, pro, limit) == pytest.approx(
                _reference_area(ref_fpr, ref_pro, limit), abs=1e-12)


def test_aupro_prefix_sort_equals_full_curve():
    """aupro sorts only the top of the scores; the full pro_curve must integrate the same."""
    maps, masks = _random_case(11, n=8, size=64, decimals=None)
    m, k = torch.from_numpy(maps).float(), torch.from_numpy(masks)
    fpr, pro = pro_curve(m, k)
    for limit in (0.3, 0.01, 0.7):
        full = _reference_area(fpr.numpy(), pro.numpy(), limit) / limit
        assert aupro(m, k, fpr_limit=limit) == pytest.approx(full, abs=1e-12)


def test_hand_computed_4x4():
    # Mask: region A = {(0,0), (1,1)} (diagonal neighbours, one region of 2 pixels),
    # region B = {(3,3)}; 13 normal pixels. Scores: A 0.9 and 0.5, B 0.7, normal (0,1) 0.8,
    # the other 12 normal pixels 0.1. Thresholds, highest first (fpr, pro):
    #   0.9 -> (0, 1/2 / 2 = 0.25); 0.8 -> (1/13, 0.25); 0.7 -> (1/13, (0.5 + 1) / 2 = 0.75);
    #   0.5 -> (1/13, 1); 0.1 -> (1, 1).
    # Area to 0.3: 0.25 * 1/13 (flat step) + 1 * (0.3 - 1/13) = 0.3 - 0.75/13,
    # AUPRO = 1 - 0.75 / (13 * 0.3) = 0.8076923...
    # Pixel AUROC for comparison: (13 + 12 + 12) / (3 * 13) = 37/39.
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 3, 3] = True
    maps = torch.full((1, 4, 4), 0.1)
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 3, 3], maps[0, 0, 1] = 0.9, 0.5, 0.7, 0.8
    assert aupro(maps, masks) == pytest.approx(1 - 0.75 / 3.9, abs=1e-9)
    fpr, pro = pro_curve(maps, masks)
    np.testing.assert_allclose(fpr.numpy(), [0, 0, 1 / 13, 1 / 13, 1 / 13, 1, 1])
    np.testing.assert_allclose(pro.numpy(), [0, 0.25, 0.25, 0.75, 1, 1, 1])


def test_perfect_maps_give_one():
    maps, masks = _random_case(5, decimals=None)
    perfect = torch.from_numpy(masks.astype(np.float32) + 0.01 * maps)
    assert aupro(perfect, torch.from_numpy(masks)) == pytest.approx(1.0)


def test_label_regions_merges_diagonals_and_never_spans_images():
    masks = torch.zeros(3, 1, 5, 5)
    masks[0, 0, 0, 0] = masks[0, 0, 1, 1] = masks[0, 0, 2, 2] = 1  # one diagonal region
    masks[0, 0, 4, 4] = 1  # a second region in image 0
    masks[1, 0, 1, 1] = 1  # same position as in image 0, but another image
    ids, n = label_regions(masks)
    assert n == 3 and ids.shape == (3, 5, 5) and ids.dtype == torch.int64
    assert ids[0, 0, 0] == ids[0, 1, 1] == ids[0, 2, 2] != 0
    assert len({int(ids[0, 0, 0]), int(ids[0, 4, 4]), int(ids[1, 1, 1])}) == 3
    assert int((ids > 0).sum()) == 5
    assert int(ids[2].abs().sum()) == 0
    # 4-connected pixels are merged too; the count of ids is the number of regions.
    assert label_regions(torch.ones(2, 3, 3, dtype=torch.bool))[1] == 2


def test_undefined_cases_are_none():
    maps = torch.rand(2, 8, 8)
    assert aupro(maps, torch.zeros(2, 8, 8)) is None  # no defect region
    assert aupro(maps, torch.ones(2, 8, 8)) is None  # no normal pixel
    assert aupro(torch.empty(0, 8, 8), torch.empty(0, 8, 8)) is None
    nan = maps.clone()
    nan[0, 1, 1] = float("nan")
    masks = torch.zeros(2, 8, 8)
    masks[0, 2:4, 2:4] = 1
    assert aupro(nan, masks) is None
    with pytest.raises(ValueError):
        pro_curve(nan, masks)
    with pytest.raises(ValueError):
        aupro(maps, masks, fpr_limit=0.0)
    with pytest.raises(ValueError):
        aupro(maps, torch.zeros(2, 8, 9))
    _, pro = pro_curve(maps, torch.zeros(2, 8, 8))
    assert torch.isnan(pro[1:-1]).all()


def test_dtype_and_image_order_invariance():
    maps, masks = _random_case(9, decimals=None)
    m32 = torch.from_numpy(maps).float()
    k = torch.from_numpy(masks)
    base = aupro(m32, k)
    assert aupro(m32.double(), k) == pytest.approx(base, abs=1e-12)
    assert aupro(m32, k.float()[:, None]) == pytest.approx(base, abs=1e-12)  # (N,1,H,W) 0/1
    perm = torch.randperm(len(k), generator=torch.Generator().manual_seed(0))
    assert aupro(m32[perm], k[perm]) == pytest.approx(base, abs=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    maps, masks = _random_case(4, decimals=2)
    m, k = torch.from_numpy(maps), torch.from_numpy(masks)
    assert aupro(m.cuda(), k.cuda()) == pytest.approx(aupro(m, k), abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("decimals", [2, None])
def test_pixel_metrics_from_one_sort_equal_separate_metrics(dtype, decimals):
    from sklearn.metrics import roc_auc_score

    from anomaly_bench.metrics import auroc, pixel_metrics

    maps, masks = _random_case(5, decimals=decimals)
    m, k = torch.from_numpy(maps).to(dtype), torch.from_numpy(masks)
    out = pixel_metrics(m, k)
    pix, pro = out["pixel_auroc"], out["aupro"]
    assert pix == pytest.approx(auroc(m, k), abs=1e-12)
    assert pix == pytest.approx(roc_auc_score(masks.ravel(), m.double().numpy().ravel()),
                                abs=1e-9)
    assert pro == pytest.approx(aupro(m, k), abs=1e-12)
    assert pro == pytest.approx(_reference_aupro(m.double().numpy(), masks), abs=1e-6)
    # no defect pixel: every pixel metric is undefined
    assert set(pixel_metrics(m, torch.zeros_like(k)).values()) == {None}
