"""Exact kNN search against brute force (torch.cdist + full sort)."""

import pytest
import torch

from anomaly_bench.ops.knn import KnnIndex, knn, pairwise_sqdist, self_knn_mean


def _brute(query, bank, k):
    d = torch.cdist(query.double(), bank.double())
    v, i = d.sort(dim=1)
    return v[:, :k], i[:, :k]


@pytest.mark.parametrize("max_bytes", [256 * 2**20, 4096, 64])
@pytest.mark.parametrize("k", [1, 5])
def test_knn_matches_brute_force_for_any_chunking(max_bytes, k):
    gen = torch.Generator().manual_seed(1)
    q, b = torch.randn(37, 12, generator=gen), torch.randn(251, 12, generator=gen)
    res = knn(q, b, k, max_bytes=max_bytes)
    dv, di = _brute(q, b, k)
    assert torch.equal(res.indices, di)
    torch.testing.assert_close(res.distances.double(), dv, atol=1e-5, rtol=1e-5)


def test_pairwise_sqdist_is_clamped_and_exact():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(9, 7, generator=gen)
    d = pairwise_sqdist(a, a)
    assert (d >= 0).all()
    ref = torch.cdist(a.double(), a.double()).square()
    torch.testing.assert_close(d.double(), ref, atol=1e-5, rtol=1e-5)


def test_knn_rejects_bad_k():
    with pytest.raises(ValueError, match="bank size"):
        knn(torch.zeros(2, 3), torch.zeros(4, 3), 5)


def test_self_knn_mean_excludes_only_self():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 50, 6, generator=gen)
    x[0, 7] = x[0, 3]  # a duplicate elsewhere still counts (distance 0)
    got = self_knn_mean(x, 4, max_bytes=1000)
    for b in range(2):
        d = torch.cdist(x[b].double(), x[b].double())
        d.fill_diagonal_(float("inf"))
        ref = d.sort(dim=1).values[:, :4].mean(1)
        # a zero distance comes out as sqrt(float32 cancellation error), about 3e-4 here
        torch.testing.assert_close(got[b].double(), ref, atol=1e-3, rtol=1e-5)
    assert torch.isfinite(got).all()


def test_knn_index_faiss_agrees_when_installed():
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(4)
    q, b = torch.randn(20, 16, generator=gen), torch.randn(100, 16, generator=gen)
    a, f = KnnIndex(b, "torch").search(q, 3), KnnIndex(b, "faiss").search(q, 3)
    assert torch.equal(a.indices, f.indices)
    torch.testing.assert_close(a.distances, f.distances, atol=1e-4, rtol=1e-4)
