"""Streaming Gaussian fit and Mahalanobis distance against a per-position reference."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from anomaly_bench.ops.gaussian import GaussianAccumulator, mahalanobis


def reference_fit(feats: np.ndarray, reg: float):
    """Per-position np.cov (unbiased) + reg*I and its inverse, one position at a time."""
    _, c, p = feats.shape
    mean = feats.mean(axis=0)
    inv = np.empty((p, c, c))
    for i in range(p):
        cov = np.cov(feats[:, :, i], rowvar=False) + reg * np.eye(c)
        inv[i] = np.linalg.inv(cov)
    return mean, inv


@pytest.mark.parametrize("batch_sizes", [[40], [7, 13, 1, 19], [2] * 20])
def test_streaming_fit_matches_two_pass_reference(batch_sizes):
    gen = torch.Generator().manual_seed(0)
    n = sum(batch_sizes)
    feats = torch.randn(n, 6, 5, generator=gen) * 3 + torch.linspace(-5, 5, 6).view(1, 6, 1)
    acc = GaussianAccumulator()
    start = 0
    for b in batch_sizes:
        acc.update(feats[start : start + b])
        start += b
    mean, inv_cov = acc.finalize(reg=0.01)
    ref_mean, ref_inv = reference_fit(feats.double().numpy(), 0.01)
    np.testing.assert_allclose(mean.numpy(), ref_mean, atol=1e-4)
    np.testing.assert_allclose(inv_cov.numpy(), ref_inv, atol=1e-4, rtol=1e-4)


def test_mahalanobis_matches_scipy():
    gen = torch.Generator().manual_seed(1)
    train = torch.randn(50, 8, 12, generator=gen)
    test = torch.randn(5, 8, 12, generator=gen) * 2
    acc = GaussianAccumulator()
    acc.update(train)
    mean, inv_cov = acc.finalize(reg=0.01)
    got = mahalanobis(test, mean, inv_cov, chunk=5)
    ref = np.array([[scipy_mahalanobis(test[b, :, i].double().numpy(),
                                       mean[:, i].double().numpy(),
                                       inv_cov[i].double().numpy())
                     for i in range(12)] for b in range(5)])
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_fit_needs_two_samples():
    acc = GaussianAccumulator()
    acc.update(torch.randn(1, 3, 4))
    with pytest.raises(ValueError):
        acc.finalize(0.01)


@pytest.mark.parametrize("sizes", [[(8, 8), (4, 4), (2, 2)], [(8, 8), (3, 3), (5, 7)]])
def test_lowrank_pyramid_equals_full_solver_on_upsampled_concatenation(sizes):
    """Per-level low-rank statistics (any nearest-upsampling factors, integer or not) give
    the Mahalanobis distance of the full covariance of the upsampled concatenation."""
    import torch.nn.functional as F

    from anomaly_bench.ops.gaussian import lowrank_fit, lowrank_mahalanobis

    gen = torch.Generator().manual_seed(2)
    chans = [3, 4, 5]
    train = [torch.randn(9, c, *s, generator=gen) * (i + 1) for i, (c, s) in
             enumerate(zip(chans, sizes, strict=True))]
    test = [torch.randn(4, c, *s, generator=gen) * 2 for c, s in zip(chans, sizes, strict=True)]

    def concat(levels):
        return torch.cat([F.interpolate(f, size=sizes[0], mode="nearest") for f in levels], 1)

    mean, inv = reference_fit(concat(train).flatten(2).double().numpy(), 0.01)
    delta = concat(test).flatten(2).double().numpy() - mean  # (4, C, P)
    want = np.sqrt(np.einsum("bcp,pcd,bdp->bp", delta, inv, delta))
    model = lowrank_fit(train, sizes[0], reg=0.01, chunk=7)
    got = lowrank_mahalanobis(test, model, chunk=7)
    assert got.shape == (4, 64) and model.whiten.shape == (64, 9, 9)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)
