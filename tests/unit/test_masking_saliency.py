"""MMR's masking: exact mask ratio, the saliency split, spectral-residual saliency and the
training view (random resized crop)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from PIL import Image

from anomaly_bench.data.views import RandomResizedCrop
from anomaly_bench.ops.masking import guided_keep, kept_count, random_keep
from anomaly_bench.ops.saliency import (
    GREY,
    component_labels,
    otsu_threshold,
    salient_boxes,
    spectral_residual,
)

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize("ratio", [0.1, 0.4, 0.75, 0.9])
def test_mask_ratio_is_exact(ratio):
    n = 196
    noise = torch.rand(5, n, generator=torch.Generator().manual_seed(0))
    inside = torch.zeros(5, n, dtype=torch.bool)
    inside[:, 30:90] = True
    k = kept_count(n, ratio)
    assert k == int(n * (1 - ratio))
    for keep in (random_keep(noise, k), guided_keep(noise, inside, k, None),
                 guided_keep(noise, inside, k, 0.8)):
        assert keep.shape == (5, k)
        assert all(len(set(row.tolist())) == k for row in keep)


def test_random_keep_is_maes_shuffle():
    noise = torch.rand(3, 50, generator=torch.Generator().manual_seed(1))
    keep = random_keep(noise, 20)
    torch.testing.assert_close(keep, torch.argsort(noise, dim=1)[:, :20])


def _square_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Grey textured images, each with one bright 32 px square (a proto-object at the
    64 x 64 scale the spectrum is taken at) at a known place; the patches (16 px, a 14 x 14
    grid at 224 px) the square covers."""
    g = torch.Generator().manual_seed(0)
    images = 0.3 + 0.05 * torch.rand(3, 3, 224, 224, generator=g)
    boxes = [(32, 64, 48, 80), (112, 144, 160, 192), (176, 208, 0, 32)]  # y0, y1, x0, x1
    truth = torch.zeros(3, 14, 14, dtype=torch.bool)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        images[i, :, y0:y1, x0:x1] = 0.95
        truth[i, y0 // 16:y1 // 16, x0 // 16:x1 // 16] = True
    return images, truth.flatten(1)


def test_salient_boxes_find_known_regions():
    images, truth = _square_images()
    inside = salient_boxes(spectral_residual(images), (14, 14))
    # the square's patches are inside; little else is (the blurred box may reach one
    # patch further on each side: at most the 4 x 4 patches around the 2 x 2 square)
    assert bool((inside & truth).sum() == truth.sum())
    assert int(inside.sum(1).max()) <= 16


@pytest.mark.parametrize("split", [None, 0.0, 0.25, 0.5, 0.9, 1.0])
def test_saliency_split_matches_the_requested_proportion(split):
    images, _ = _square_images()
    inside = salient_boxes(spectral_residual(images), (14, 14))
    n, k = 196, kept_count(196, 0.4)
    m = n - k
    noise = torch.rand(3, n, generator=torch.Generator().manual_seed(2))
    keep = guided_keep(noise, inside, k, split)
    masked = torch.ones(3, n, dtype=torch.bool).scatter_(1, keep, False)
    for i in range(3):
        n_in = int(inside[i].sum())
        want = round(m * (n_in / n if split is None else split))
        want = max(min(want, n_in), m - (n - n_in))
        assert int((masked[i] & inside[i]).sum()) == want
        assert int(masked[i].sum()) == m
    # within a side, the masked patches are the ones of largest noise (MAE's rule)
    got_in = masked[0] & inside[0]
    if got_in.any() and (inside[0] & ~got_in).any():
        assert noise[0][got_in].min() > noise[0][inside[0] & ~got_in].max()


def test_spectral_residual_matches_opencv():
    """Reference: OpenCV 4.10's ``saliency.StaticSaliencySpectralResidual`` (contrib) on
    64 x 64 BGR uint8 images, stored in tests/data/saliency_opencv.npz. OpenCV reads the
    8-bit grey image (rounded) and takes the phase with its fast atan2 (about 0.3 degrees
    off), hence a tolerance of 3e-3 on maps scaled to a maximum of 1."""
    ref = np.load(DATA / "saliency_opencv.npz")
    rgb = torch.from_numpy(ref["images"]).permute(0, 3, 1, 2).float()
    grey = (rgb * torch.tensor(GREY).view(1, 3, 1, 1)).sum(1, keepdim=True).round() / 255
    ours = spectral_residual(grey.expand(-1, 3, -1, -1)).numpy()
    np.testing.assert_allclose(ours, ref["saliency"], atol=3e-3)
    for o, r in zip(ours, ref["saliency"], strict=True):
        assert o.argmax() == r.argmax()


def test_component_labels_are_8_connected_regions():
    rng = np.random.default_rng(0)
    fg = rng.random((2, 40, 40)) > 0.6
    labels = component_labels(torch.from_numpy(fg)).numpy()
    for f, lab in zip(fg, labels, strict=True):
        ref, n = ndi.label(f, structure=np.ones((3, 3)))
        assert len(np.unique(lab[f])) == n and (lab[~f] == 0).all()
        pairs = {(a, b) for a, b in zip(ref[f], lab[f], strict=True)}
        assert len(pairs) == n  # one label per reference region, and vice versa


def test_otsu_threshold_maximises_between_class_variance():
    rng = np.random.default_rng(1)
    maps = np.clip(np.concatenate([rng.normal(0.2, 0.05, 600), rng.normal(0.8, 0.05, 400)]),
                   0, 1).reshape(1, 25, 40)
    t = float(otsu_threshold(torch.from_numpy(maps).float())[0])
    levels = np.round(maps.ravel() * 255)
    best = max(range(255), key=lambda c: (
        (levels <= c).mean() * (levels > c).mean()
        * (levels[levels <= c].mean() - levels[levels > c].mean()) ** 2
        if 0 < (levels <= c).sum() < levels.size else -1))
    assert (best + 0.5) / 255 == pytest.approx(t)


def test_random_resized_crop_is_torchvisions_geometry():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (90, 140, 3), dtype=np.uint8))
    view = RandomResizedCrop(size=48, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3))
    for seed in range(20):
        draws = np.random.default_rng(seed).random(view.n_draws).tolist()
        top, left, h, w = view.box(140, 90, draws)
        assert 0.7 * 140 * 90 * 0.9 <= h * w <= 140 * 90 and 0 <= top and top + h <= 90
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1 and 0 <= left and left + w <= 140
        ours = np.asarray(view.apply(image, draws))
        ref = tvf.resized_crop(image, top, left, h, w, [48, 48], InterpolationMode.BICUBIC)
        if draws[-1] < 0.5:
            ref = tvf.hflip(ref)
        np.testing.assert_array_equal(ours, np.asarray(ref))
    # no box fits in 10 tries: torchvision's central crop of the nearest allowed ratio
    narrow = RandomResizedCrop(size=8, scale=(0.99, 1.0), ratio=(3.0, 4.0))
    assert narrow.box(100, 100, [0.5] * narrow.n_draws) == (33, 0, 33, 100)
