"""aupro_200 (APRIL-GAN) and aupro_200_per_image (MMR) against a slow per-threshold
implementation and against transcriptions of the two repositories' own functions."""

from __future__ import annotations

import math
from itertools import pairwise
from statistics import mean

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import auc

from anomaly_bench.metrics import aupro_200, aupro_200_per_image, compute_metrics
from anomaly_bench.metrics import pro200 as pro200_module

EIGHT = np.ones((3, 3), dtype=int)


# ---------------------------------------------------------------------- slow definitions
def _slow_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[list[float], list[float]]:
    """(fpr, pro) at t_k = lo + k (hi - lo) / 200, k = 0..199, over all pixels given:
    positive means score > t_k; PRO the mean over every 8-connected region of each image."""
    lo, hi = float(maps.min()), float(maps.max())
    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=EIGHT)
        regions += [(i, lab == r) for r in range(1, n + 1)]
    normal = ~masks
    fprs, pros = [], []
    for k in range(200):
        t = lo + k * ((hi - lo) / 200)
        pred = maps > t
        fprs.append((pred & normal).sum() / normal.sum())
        pros.append(sum((pred[i] & r).sum() / r.sum() for i, r in regions) / len(regions))
    return fprs, pros


def _slow_area(fprs: list[float], pros: list[float], min_max: bool) -> float | None:
    kept = [(f, p) for f, p in zip(fprs, pros, strict=True) if f < 0.3]
    if len(kept) < 2:
        return None
    xs = [f for f, _ in kept]
    low, top = (min(xs) if min_max else 0.0), max(xs)
    if top <= low:
        return None
    area = 0.0
    for (f0, p0), (f1, p1) in pairwise(kept):
        area += 0.5 * abs((f1 - low) / (top - low) - (f0 - low) / (top - low)) * (p0 + p1)
    return area


def slow_aupro_200(maps: np.ndarray, masks: np.ndarray) -> float | None:
    if maps.max() == maps.min():
        return None
    return _slow_area(*_slow_curve(maps, masks), min_max=True)


def slow_per_image(maps: np.ndarray, masks: np.ndarray) -> float | None:
    areas = []
    for m, k in zip(maps, masks, strict=True):
        if not k.any():
            continue
        if m.max() == m.min() or k.all():
            return None
        area = _slow_area(*_slow_curve(m[None], k[None]), min_max=False)
        if area is None:
            return None
        areas.append(area)
    return float(np.mean(areas)) if areas else None


# ---------------------------------------------------------------------- transcriptions
def april_gan_cal_pro_score(masks, amaps, max_step=200, expect_fpr=0.3):
    """Transcription of ByChelsea/VAND-APRIL-GAN, test.py, ``cal_pro_score`` (HEAD).

    The one substitution: ``skimage.measure.label`` (full connectivity in 2-D) and
    ``regionprops`` are replaced by ``scipy.ndimage.label`` with a 3x3 structure and the
    region's pixel list, the same 8-connected regions.
    """
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / max_step
    pros, fprs, ths = [], [], []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[amaps <= th], binary_amaps[amaps > th] = 0, 1
        pro = []
        for binary_amap, mask in zip(binary_amaps, masks, strict=True):
            lab, n = ndimage.label(mask, structure=EIGHT)
            for r in range(1, n + 1):
                coords = np.argwhere(lab == r)
                tp_pixels = binary_amap[coords[:, 0], coords[:, 1]].sum()
                pro.append(tp_pixels / len(coords))
        inverse_masks = 1 - masks
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        fpr = fp_pixels / inverse_masks.sum()
        pros.append(np.array(pro).mean())
        fprs.append(fpr)
        ths.append(th)
    pros, fprs, ths = np.array(pros), np.array(fprs), np.array(ths)
    idxes = fprs < expect_fpr
    fprs = fprs[idxes]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    pro_auc = auc(fprs, pros[idxes])
    return pro_auc


def mmr_compute_pro(anomaly_map, gt_mask, label, num_th=200):
    """Transcription of zhangzilongc/MMR, utils/common.py, ``compute_pro`` (HEAD).

    Substitutions: the label/regionprops one of :func:`april_gan_cal_pro_score`;
    ``np.bool`` (gone from NumPy) is ``bool``; the per-image ``pandas.DataFrame`` of rows
    appended one by one (``DataFrame.append`` is gone from pandas 2) is the same columns
    kept in NumPy arrays, filtered and divided as the DataFrame was. The input asserts are
    kept.
    """
    assert anomaly_map.ndim == 3 and gt_mask.ndim == 3
    assert anomaly_map.shape == gt_mask.shape
    assert set(gt_mask.flatten()) == {0, 1}
    current_amap = anomaly_map[label != 0]
    current_mask = gt_mask[label != 0].astype(int)
    binary_amaps = np.zeros_like(current_amap[0], dtype=bool)
    pro_auc_list = []
    for anomaly_mask, mask in zip(current_amap, current_mask, strict=True):
        rows_pro, rows_fpr = [], []
        min_th = anomaly_mask.min()
        max_th = anomaly_mask.max()
        delta = (max_th - min_th) / num_th
        for th in np.arange(min_th, max_th, delta):
            binary_amaps[anomaly_mask <= th] = 0
            binary_amaps[anomaly_mask > th] = 1
            pros = []
            lab, n = ndimage.label(mask, structure=EIGHT)
            for r in range(1, n + 1):
                coords = np.argwhere(lab == r)
                tp_pixels = binary_amaps[coords[:, 0], coords[:, 1]].sum()
                pros.append(tp_pixels / len(coords))
            inverse_masks = 1 - mask
            fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
            fpr = fp_pixels / inverse_masks.sum()
            rows_pro.append(mean(pros))
            rows_fpr.append(fpr)
        fpr_col, pro_col = np.array(rows_fpr, dtype=float), np.array(rows_pro, dtype=float)
        keep = fpr_col < 0.3
        fpr_col, pro_col = fpr_col[keep], pro_col[keep]
        fpr_col = fpr_col / fpr_col.max()
        pro_auc = auc(fpr_col, pro_col)
        pro_auc_list.append(pro_auc)
    return pro_auc_list


def _arange_count(m: np.ndarray) -> int:
    """How many thresholds the repositories' ``np.arange(lo, hi, (hi - lo) / 200)`` gives."""
    lo, hi = m.min(), m.max()
    return len(np.arange(lo, hi, (hi - lo) / 200))


# ---------------------------------------------------------------------- data
def _case(seed: int, n: int = 5, size: int = 24, decimals: int | None = None):
    """Smooth-ish maps raised on the defects; image 0 defect-free, image 1 with two
    diagonally touching pixels (one 8-connected region), others rectangles and discs."""
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
                masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= (1 + rng.random() * 5) ** 2
    masks[1, 5, 5] = masks[1, 6, 6] = True
    maps = rng.random(masks.shape) * 0.7 + 0.4 * masks * rng.random((n, 1, 1))
    if decimals is not None:
        maps = np.round(maps, decimals)
    return maps, masks


def _torch(maps, masks, dtype=torch.float64):
    return torch.from_numpy(maps).to(dtype), torch.from_numpy(masks)


# ---------------------------------------------------------------------- vs the slow definitions
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_match_slow_definitions(seed, decimals, dtype):
    """float32 maps compare with float64 thresholds exactly (the slow code upcasts);
    rounded maps put scores exactly on thresholds (0.01 = 2 x 0.005), where > matters."""
    maps, masks = _case(seed, decimals=decimals)
    m, k = _torch(maps, masks, dtype)
    ref = m.double().numpy()
    assert aupro_200(m, k) == pytest.approx(slow_aupro_200(ref, masks), abs=1e-6)
    assert aupro_200_per_image(m, k) == pytest.approx(slow_per_image(ref, masks), abs=1e-6)


def test_float32_and_float64_maps_give_the_same_counts():
    maps, masks = _case(4)
    m32, k = _torch(maps, masks, torch.float32)
    for fn in (aupro_200, aupro_200_per_image):
        assert fn(m32, k) == pytest.approx(fn(m32.double(), k), abs=1e-12)


def test_chunks_channel_dim_and_image_order_do_not_matter(monkeypatch):
    maps, masks = _case(5, n=7)
    m, k = _torch(maps, masks, torch.float32)
    base = aupro_200_per_image(m, k)
    perm = torch.randperm(len(k), generator=torch.Generator().manual_seed(0))
    assert aupro_200_per_image(m[perm], k[perm]) == pytest.approx(base, abs=1e-12)
    assert aupro_200_per_image(m[:, None], k.float()[:, None]) == pytest.approx(base, abs=1e-12)
    assert aupro_200(m[perm], k[perm]) == pytest.approx(aupro_200(m, k), abs=1e-12)
    monkeypatch.setattr(pro200_module, "CHUNK_PIXELS", 24 * 24 * 2)  # 2 images per chunk
    assert aupro_200_per_image(m, k) == pytest.approx(base, abs=1e-12)


def test_always_200_thresholds_where_numpy_arange_gives_201():
    """The repositories' np.arange adds a threshold at about the maximum for some ranges
    by rounding; the definition has 200, which the slow code and ours both use."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        maps, masks = _case(int(rng.integers(1 << 30)), n=3, size=12)
        if _arange_count(maps) == 201:
            break
    else:
        pytest.fail("no range with 201 np.arange thresholds among the tries")
    m, k = _torch(maps, masks)
    lo, hi = m.min().reshape(1), m.max().reshape(1)
    assert pro200_module._thresholds(lo, hi, torch.float64).shape == (1, 200)
    assert aupro_200(m, k) == pytest.approx(slow_aupro_200(maps, masks), abs=1e-6)


# ---------------------------------------------------------------------- vs the repositories
# Seeds whose score ranges give np.arange exactly 200 thresholds (checked below), where the
# repositories compute the definition; see test_always_200_thresholds_where_numpy_arange...
@pytest.mark.parametrize("seed", [0, 1, 3])
def test_aupro_200_matches_april_gan_cal_pro_score(seed):
    maps, masks = _case(seed, n=4, size=20)
    assert _arange_count(maps) == 200
    ref = april_gan_cal_pro_score(masks.astype(int), maps)
    assert aupro_200(*_torch(maps, masks)) == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_per_image_matches_mmr_compute_pro(seed):
    maps, masks = _case(seed, n=4, size=20)
    labels = masks.reshape(len(masks), -1).any(1).astype(int)
    assert all(_arange_count(m) == 200 for m, y in zip(maps, labels, strict=True) if y)
    ref = mmr_compute_pro(maps, masks.astype(int), labels)
    assert len(ref) == int(labels.sum())
    assert aupro_200_per_image(*_torch(maps, masks)) == pytest.approx(np.mean(ref), abs=1e-6)


# ---------------------------------------------------------------------- degenerate maps
def test_hand_computed_single_image():
    """One 1x7 image: defects D1 = 1.0 (x=0) and D2 = 0.4 (x=6), two regions; normal
    pixels 0.0, 0.1, 0.1, 0.6, 0.05. lo 0, hi 1, t_k = k / 200. FPR: 4/5 for t < 0.05,
    3/5 below 0.1, 1/5 for 0.1 <= t < 0.6 (k = 20..119), then 0: kept k = 20..199, whose
    FPR 1/5 rescales to 1 either way (its minimum is 0). PRO: 1 while D2 is above t
    (k < 80), then 1/2. The only step in x is at k = 119 -> 120, at PRO 1/2: area 0.5."""
    maps = torch.tensor([[[1.0, 0.0, 0.1, 0.1, 0.6, 0.05, 0.4]]], dtype=torch.float64)
    masks = torch.tensor([[[1, 0, 0, 0, 0, 0, 1]]])
    assert aupro_200(maps, masks) == pytest.approx(0.5, abs=1e-12)
    assert aupro_200_per_image(maps, masks) == pytest.approx(0.5, abs=1e-12)
    assert aupro_200(maps.float(), masks) == pytest.approx(0.5, abs=1e-12)
    assert slow_per_image(maps.numpy(), masks.numpy().astype(bool)) == pytest.approx(0.5)


def test_constant_map_is_undefined():
    maps, masks = _case(0)
    m, k = _torch(np.full_like(maps, 0.5), masks)
    assert aupro_200(m, k) is None and aupro_200_per_image(m, k) is None
    with pytest.raises((ZeroDivisionError, ValueError)), np.errstate(invalid="ignore"):
        april_gan_cal_pro_score(masks.astype(int), np.full_like(maps, 0.5))  # arange step 0
    out = compute_metrics(m.flatten(1).amax(1), k.flatten(1).any(1), m, k)
    assert out["aupro_200"] is None and out["aupro_200_per_image"] is None
    assert out["pixel_auroc"] == pytest.approx(0.5)  # the rest stays defined


def test_one_constant_image_empties_the_per_image_cell():
    maps, masks = _case(1)
    maps[3] = 0.25
    m, k = _torch(maps, masks)
    assert aupro_200(m, k) == pytest.approx(slow_aupro_200(maps, masks), abs=1e-6)
    assert aupro_200_per_image(m, k) is None
    assert slow_per_image(maps, masks) is None


def test_every_kept_fpr_zero_is_undefined_where_the_repositories_give_nan():
    """Maps equal to the masks: above the lowest threshold only defect pixels are positive,
    so every kept FPR is 0 and neither rescaling is defined."""
    _, masks = _case(2)
    maps = masks.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        assert math.isnan(april_gan_cal_pro_score(masks.astype(int), maps))
        labels = masks.reshape(len(masks), -1).any(1).astype(int)
        assert all(math.isnan(v) for v in mmr_compute_pro(maps, masks.astype(int), labels))
    m, k = _torch(maps, masks)
    assert aupro_200(m, k) is None and aupro_200_per_image(m, k) is None


def test_no_defect_or_no_normal_pixel_or_nan_is_undefined():
    maps, masks = _case(3)
    m, k = _torch(maps, masks)
    for fn in (aupro_200, aupro_200_per_image):
        assert fn(m, torch.zeros_like(k)) is None  # no defect
        assert fn(m, torch.ones_like(k)) is None  # no defect-free pixel
        assert fn(torch.empty(0, 4, 4), torch.empty(0, 4, 4)) is None
        nan = m.clone()
        nan[2, 3, 3] = float("nan")
        assert fn(nan, k) is None
    full = masks.copy()
    full[4] = True  # one image entirely defect: its FPR has no pixel to count
    m, k = _torch(maps, full)
    assert aupro_200_per_image(m, k) is None
    assert aupro_200(m, k) == pytest.approx(slow_aupro_200(maps, full), abs=1e-6)


def test_one_image():
    maps, masks = _case(6, n=3)
    m, k = _torch(maps[2:], masks[2:])
    out = compute_metrics(m.flatten(1).amax(1), k.flatten(1).any(1), m, k)
    assert out["image_auroc"] is None and out["image_ap"] is None  # one class
    assert out["aupro_200"] == pytest.approx(slow_aupro_200(maps[2:], masks[2:]), abs=1e-6)
    assert out["aupro_200_per_image"] == pytest.approx(slow_per_image(maps[2:], masks[2:]),
                                                       abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    maps, masks = _case(4, decimals=2)
    m, k = _torch(maps, masks, torch.float32)
    for fn in (aupro_200, aupro_200_per_image):
        assert fn(m.cuda(), k.cuda()) == pytest.approx(fn(m, k), abs=1e-9)


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_buckets_read_off_the_step_equal_a_binary_search(offset):
    """The CPU's per-image buckets equal ``searchsorted``: with scores on thresholds
    (rounded maps) and where float32 cannot tell thresholds apart (a large offset makes
    many of the 200 round to one value, so the count read off the step is checked and
    searched again)."""
    maps, masks = _case(6, n=6, decimals=2)
    scale = 1e-3 if offset else 1.0
    m = torch.from_numpy(maps).float() * scale + offset
    s = m.reshape(len(m), -1)
    lo, hi = s.amin(1), s.amax(1)
    t = pro200_module._thresholds(lo, hi, s.dtype)
    if offset:
        assert t[2].unique().numel() < pro200_module.STEPS
    assert torch.equal(pro200_module._below(s, t, lo, hi), torch.searchsorted(t, s))
    k = torch.from_numpy(masks)
    assert aupro_200_per_image(m, k) == pytest.approx(
        slow_per_image(m.double().numpy(), masks), abs=1e-6)


def test_a_score_on_a_threshold_where_the_step_rounds_up_is_searched():
    """lo = 0, hi = 0.42268723: t_15 = 15 (hi - lo) / 200 is a float32 value, and
    (t_15 - lo) / step rounds to just above 15 in float64, so the count read off the step
    (16) is wrong for that score; the check finds it and the search gives 15."""
    hi = np.float32(0.42268723)
    on = np.float32(15 * (float(hi) / 200))
    assert float(on) == 15 * (float(hi) / 200)
    assert math.ceil(float(on) / (float(hi) / 200)) == 16
    s = torch.tensor([[0.0, float(hi), float(on), 0.2, 0.1]], dtype=torch.float32)
    lo, top = s.amin(1), s.amax(1)
    t = pro200_module._thresholds(lo, top, s.dtype)
    below = pro200_module._below(s, t, lo, top)
    assert int(below[0, 2]) == 15
    assert torch.equal(below, torch.searchsorted(t, s))
