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


# ---------------------------------------------------------------- bfloat16-screened 1-NN
def _near_duplicates(n: int, d: int, seed: int, scale: float = 1e-3) -> torch.Tensor:
    """Rows sharing a large mean and differing by little: nearest distances far below the
    norms, where a loose rounding bound would prune the true neighbour."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=gen) * 5
    clusters = torch.randn(8, d, generator=gen)
    rows = clusters[torch.randint(0, 8, (n,), generator=gen)]
    return base + rows + scale * torch.randn(n, d, generator=gen)


def _check_screened(search, query, bank, rows=None, **kw):
    got_d, got_i = search.nearest(query, rows, **kw)
    d = torch.cdist(query.double(), bank.double()).square()
    if rows is not None:  # rows outside the gallery never count
        outside = torch.ones(bank.shape[0], dtype=torch.bool)
        outside[rows] = False
        d[:, outside] = float("inf")
    ref_d, ref_i = d.min(dim=1)
    torch.testing.assert_close(got_d.double(), ref_d, rtol=1e-6, atol=1e-12)
    # the same entry, or one at the same distance to float32 resolution (a tie)
    at_got = d.gather(1, got_i.unsqueeze(1))[:, 0]
    assert ((got_i == ref_i) | ((at_got - ref_d) <= 1e-6 * ref_d)).all()
    assert (got_i == ref_i).float().mean() > 0.9


@pytest.mark.parametrize("dims", [None, 6])  # every coordinate; 6 principal ones + the rest
@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_screened_search_equals_float64_reference(scale, dims):
    from anomaly_bench.ops.screen import ScreenedSearch

    bank = _near_duplicates(700, 48, seed=1, scale=scale)
    gen = torch.Generator().manual_seed(2)
    near = bank[torch.randint(0, 700, (150,), generator=gen)] + scale * 0.3 * torch.randn(
        150, 48, generator=gen)
    far = torch.randn(20, 48, generator=gen) * 20  # defects: far from every bank row
    search = ScreenedSearch(bank, dims=dims)
    assert search.dims == (48 if dims is None else 7)
    # small tiles: many query blocks and bank spans, the bound tightening from tile to tile
    _check_screened(search, torch.cat([near, far]), bank, tile_rows=64, tile_cols=96)


@pytest.mark.parametrize("dims", [None, 8])
def test_screened_search_over_a_gallery_of_rows(dims):
    from anomaly_bench.ops.screen import ScreenedSearch

    bank = _near_duplicates(600, 32, seed=3)
    search = ScreenedSearch(bank, dims=dims)
    # the rows of images 1, 2 and 5 of six 100-row images: two runs of consecutive rows
    rows = torch.cat([torch.arange(100, 300), torch.arange(500, 600)])
    query = bank[torch.arange(0, 600, 7)] + 1e-4
    _check_screened(search, query, bank, rows, tile_rows=32, tile_cols=64)


def test_screened_search_ties_give_the_smallest_index():
    from anomaly_bench.ops.screen import ScreenedSearch

    bank = _near_duplicates(300, 16, seed=4)
    bank[250] = bank[40]
    bank[260] = bank[40]
    search = ScreenedSearch(bank)
    _, idx = search.nearest(torch.stack([bank[40], bank[260]]), tile_cols=50)
    assert idx.tolist() == [40, 40]


def test_screened_search_checks_few_entries_exactly(monkeypatch):
    """The screen rules out all but a few entries per query (what makes it fast), on
    well-separated and on near-duplicate rows alike."""
    import anomaly_bench.ops.screen as screen

    checked = []
    inner = screen._nonpositive

    def counting(z):
        qi, bi = inner(z)
        checked.append(qi.numel())
        return qi, bi

    monkeypatch.setattr(screen, "_nonpositive", counting)
    gen = torch.Generator().manual_seed(6)
    for scale in (1.0, 0.3):  # nearest distances 1 and 1/100 of the squared norms
        bank = _near_duplicates(2000, 64, seed=5, scale=scale)
        query = bank[:200] + scale * 0.2 * torch.randn(200, 64, generator=gen)
        checked.clear()
        screen.ScreenedSearch(bank).nearest(query, tile_cols=256)
        assert sum(checked) < 0.01 * 200 * 2000, (scale, sum(checked))
    # 16 principal coordinates of rows whose variance decays (as CNN features' does)
    spectrum = torch.logspace(0, -2, 64)
    bank = torch.randn(2000, 64, generator=gen) * spectrum @ torch.linalg.qr(
        torch.randn(64, 64, generator=gen))[0]
    query = bank[:200] + 0.05 * torch.randn(200, 64, generator=gen) * spectrum
    checked.clear()
    screen.ScreenedSearch(bank, dims=16).nearest(query, tile_cols=256)
    assert sum(checked) < 0.01 * 200 * 2000, sum(checked)


def test_bfloat16_parts_sum_to_the_float32_value():
    from anomaly_bench.ops.screen import _parts

    v = torch.cat([torch.rand(1000) * 10 ** torch.randint(-6, 6, (1000,)).float(),
                   torch.tensor([0.0, 1.0, 3.0e5])])
    total = _parts(v).double().sum(-1)
    assert torch.equal(total, v.double())


@pytest.mark.parametrize("k", [1, 7])
def test_returned_distances_are_sums_of_squared_differences(k):
    """Features sharing a large mean: the product form |q|^2 - 2 q.b + |b|^2 cancels (its
    error scales with |q| |b|, and with the kernel's summation order); the distances knn
    returns are measured again as sums of squared differences, whose relative error is
    at most gamma_D = D u / (1 - D u) for any order (u = 2^-24), so they agree with a
    float64 reference to that bound on every CPU."""
    gen = torch.Generator().manual_seed(5)
    d = 256
    q = 50 + torch.randn(40, d, generator=gen)
    b = 50 + torch.randn(300, d, generator=gen)
    ref, ref_i = _brute(q, b, k)
    got = knn(q, b, k)
    plain = knn(q, b, k, remeasure=False)
    u = 2.0 ** -24
    gamma = d * u / (1 - d * u)
    same = got.indices == ref_i  # a near-tie may pick the other neighbour: compare the rest
    assert same.float().mean() > 0.9
    rel = ((got.distances.double().square() - ref.square()).abs() / ref.square())[same]
    assert rel.max() <= gamma, rel.max()
    rel_plain = ((plain.distances.double().square() - ref.square()).abs() / ref.square())[same]
    assert rel_plain.max() > 10 * gamma  # what the product form alone would report
    assert torch.equal(got.distances, got.distances.sort(dim=1).values)  # ascending
