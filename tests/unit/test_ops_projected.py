"""Exact 1-NN with a projected lower bound, against a float64 brute-force search."""

import pytest
import torch

from anomaly_bench.ops.knn import KnnIndex, knn
from anomaly_bench.ops.projected import ProjectedSearch


def _structured(n: int, d: int = 512, rank: int = 12, seed: int = 0) -> torch.Tensor:
    """Rows with most of their variance in a few directions, like CNN patch features
    (512-d by default; PatchCore's embeddings are 1024-d)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=gen)
    scale = torch.linspace(4.0, 0.5, rank)
    coords = torch.randn(n, rank, generator=gen) * scale
    return coords @ basis + 0.05 * torch.randn(n, d, generator=gen) + 3.0


def _reference(query: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.cdist(query.double(), bank.double()).square()
    return d.min(dim=1)


def _check(search: ProjectedSearch, query: torch.Tensor, bank: torch.Tensor) -> None:
    dist, idx = search.nearest(query, rows=100)
    ref_d, ref_i = _reference(query, bank)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-4, atol=1e-4)


def test_structured_bank_is_pruned_and_exact():
    bank = _structured(1500)
    search = ProjectedSearch.build(bank - bank.mean(0), bank.mean(0))
    assert search is not None and search.dims < bank.shape[1]
    gen = torch.Generator().manual_seed(1)
    normal = bank[torch.randint(0, 1500, (300,), generator=gen)] + 0.3 * torch.randn(
        300, bank.shape[1], generator=gen)
    outliers = _structured(50, seed=7) * 3  # far from every bank row, like defects
    _check(search, torch.cat([normal, outliers]), bank)


@pytest.mark.parametrize("dims", [16, 64])
def test_any_projection_size_stays_exact(dims):
    """A loose bound (few dimensions, unstructured queries) only costs time, never accuracy."""
    bank = _structured(800, seed=2)
    full = ProjectedSearch.build(bank - bank.mean(0), bank.mean(0))
    assert full is not None
    basis = torch.linalg.qr(torch.randn(bank.shape[1], dims, dtype=torch.float64,
                                        generator=torch.Generator().manual_seed(3)))[0].float()
    proj = full.centred @ basis
    loose = ProjectedSearch(full.mean, full.centred, full.centred_sq, basis, proj,
                            (proj * proj).sum(1))
    query = torch.randn(200, bank.shape[1], generator=torch.Generator().manual_seed(4)) + 3
    _check(loose, query, bank)


def test_duplicate_entries_give_the_smallest_index():
    bank = _structured(700, seed=5)
    bank[600] = bank[10]  # an exact duplicate: both are nearest to anything near bank[10]
    search = ProjectedSearch.build(bank - bank.mean(0), bank.mean(0))
    assert search is not None
    _, idx = search.nearest(torch.stack([bank[10], bank[10] + 1e-3]))
    assert idx.tolist() == [10, 10]


def test_unstructured_or_small_banks_fall_back_to_brute_force():
    gen = torch.Generator().manual_seed(6)
    isotropic = torch.randn(2000, 128, generator=gen)
    assert ProjectedSearch.build(isotropic, torch.zeros(128)) is None
    assert ProjectedSearch.build(_structured(300), torch.zeros(512)) is None  # too small to pay off


def test_few_dimensions_fall_back_to_brute_force():
    """At d = 256 brute force costs 256 multiply-adds per entry, little more than writing,
    scanning and comparing a bound matrix: the same structured rows are pruned at d = 512
    and searched by brute force at d = 256."""
    for d, pruned in ((512, True), (256, False)):
        bank = _structured(1500, d=d)
        search = ProjectedSearch.build(bank - bank.mean(0), bank.mean(0))
        assert (search is not None) == pruned, d


def test_index_uses_the_bound_for_one_neighbour_only():
    bank = _structured(1200, seed=8)
    index = KnnIndex(bank)
    assert index.projected is not None
    query = bank[:50] + 0.1
    one = index.search(query, 1)
    three = index.search(query, 3)  # k > 1: brute force
    ref_d, ref_i = _reference(query, bank)
    assert torch.equal(one.indices[:, 0], ref_i) and torch.equal(three.indices[:, 0], ref_i)
    torch.testing.assert_close(one.distances[:, 0].double(), ref_d.sqrt(), rtol=1e-4, atol=1e-4)
    assert KnnIndex(bank, prune=False).projected is None
    plain = knn(query, bank, 1)
    assert torch.equal(plain.indices, one.indices)
