"""Gaussian blur against scipy's gaussian_filter on the interior and on the borders."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from anomaly_bench.ops.blur import gaussian_blur, gaussian_kernel1d


def test_kernel_is_normalised_with_scipy_radius():
    k = gaussian_kernel1d(4.0)
    assert k.numel() == 2 * 16 + 1
    assert abs(float(k.sum()) - 1.0) < 1e-6


@pytest.mark.parametrize("shape", [(3, 64, 80), (1, 40, 600)])  # banded products / convs
def test_blur_matches_scipy_mirror_mode(shape):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = gaussian_blur(x, 4.0).numpy()
    # torch "reflect" padding excludes the edge pixel, which is scipy's "mirror" mode.
    ref = np.stack([gaussian_filter(m, 4.0, mode="mirror", truncate=4.0) for m in x.numpy()])
    np.testing.assert_allclose(got, ref, atol=1e-10)


@pytest.mark.parametrize("shape", [(2, 40, 52), (1, 24, 530)])  # dense path / conv path
@pytest.mark.parametrize("border", ["mirror", "reflect"])
def test_blur_borders_match_scipy_modes_in_float32(shape, border):
    """``border`` is named as scipy.ndimage's mode: ``reflect`` repeats the edge pixel (the
    official PatchCore code's gaussian_filter default), ``mirror`` does not (torch pad)."""
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    got = gaussian_blur(x, 4, border=border).numpy()
    x64 = x.double().numpy()
    ref = np.stack([gaussian_filter(m, 4, mode=border, truncate=4) for m in x64])
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # the same from explicit padding: numpy's "symmetric" is scipy's reflect, its
    # "reflect" scipy's mirror
    pad = np.pad(x64, ((0, 0), (16, 16), (16, 16)),
                 mode={"reflect": "symmetric", "mirror": "reflect"}[border])
    k = gaussian_kernel1d(4.0, dtype=torch.float64).numpy()
    rows = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 2, pad)
    explicit = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 1, rows)
    np.testing.assert_allclose(got, explicit, atol=1e-5)
    other = {"reflect": "mirror", "mirror": "reflect"}[border]
    assert np.abs(got - np.stack([gaussian_filter(m, 4, mode=other, truncate=4)
                                  for m in x64])).max() > 1e-3  # the borders differ


def test_default_border_is_mirror_and_unknown_borders_are_refused():
    x = torch.rand(1, 30, 30, generator=torch.Generator().manual_seed(2))
    assert torch.equal(gaussian_blur(x, 2.0), gaussian_blur(x, 2.0, border="mirror"))
    with pytest.raises(ValueError, match="border='wrap'"):
        gaussian_blur(x, 2.0, border="wrap")


def test_blur_keeps_shape_for_4d_and_tiny_maps():
    x = torch.rand(2, 1, 10, 12)
    assert gaussian_blur(x, 4.0).shape == x.shape  # smaller than the radius: replicate
    torch.testing.assert_close(gaussian_blur(x, 4.0, border="reflect"), gaussian_blur(x, 4.0))
    assert torch.equal(gaussian_blur(x, 0.0), x)
