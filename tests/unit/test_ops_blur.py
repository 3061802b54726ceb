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


def test_blur_keeps_shape_for_4d_and_tiny_maps():
    x = torch.rand(2, 1, 10, 12)
    assert gaussian_blur(x, 4.0).shape == x.shape  # smaller than the radius: replicate
    assert torch.equal(gaussian_blur(x, 0.0), x)
