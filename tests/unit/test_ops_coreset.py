"""Greedy k-center coreset: the fast selection equals the straightforward greedy loop."""

import pytest
import torch

from anomaly_bench.ops.coreset import (
    coreset_size,
    greedy_coreset,
    random_projection,
    reference_greedy_coreset,
)


def _clustered(n, d, seed=0, duplicates=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, d, generator=g) * 3
    x = centres[torch.randint(0, 20, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    x[duplicates:2 * duplicates] = x[:duplicates]
    return x


@pytest.mark.parametrize(("n", "d", "ratio", "n_starts", "pool"), [
    (3000, 64, 0.1, 10, 256),    # pool much smaller than the selection: many rounds
    pytest.param(3000, 300, 0.5, 0, 512,  # projected; classic start from one random point
                 marks=pytest.mark.slow),
    (2000, 64, 0.9, 10, 4096),   # pool larger than N
    (1500, 32, 0.005, 10, 64),
])
def test_selection_equals_reference_greedy(n, d, ratio, n_starts, pool):
    x = _clustered(n, d, duplicates=50)
    k = coreset_size(n, ratio)
    ours = greedy_coreset(x, k, projection_dim=128, n_starts=n_starts, seed=3, pool=pool,
                          dtype=torch.float64)
    ref = reference_greedy_coreset(random_projection(x, 128, seed=3), k, n_starts=n_starts,
                                   seed=3, dtype=torch.float64)
    assert torch.equal(ours, ref)
    assert len(set(ours.tolist())) == k


def test_float32_selection_matches_up_to_near_ties():
    """In float32 the two orders may only differ where two distances tie within rounding."""
    x = _clustered(3000, 64)
    proj = random_projection(x, 128, seed=0)
    ours = greedy_coreset(x, 300, seed=0, pool=256)
    ref = reference_greedy_coreset(proj, 300, seed=0)
    # coverage radius after the selection: identical up to float rounding
    def radius(idx):
        return torch.cdist(proj.double(), proj[idx].double()).min(dim=1).values.max()
    assert float(radius(ours)) == pytest.approx(float(radius(ref)), rel=1e-4)
    same = (ours == ref).cumprod(0).sum()
    assert same >= 50  # the early, well-separated choices are identical


def test_reference_on_points_on_a_line():
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [4.0]])
    # start at index of the random permutation's first element; then farthest-first
    idx = reference_greedy_coreset(x, 3, n_starts=0, seed=0).tolist()
    first = idx[0]
    far = max(range(5), key=lambda i: abs(x[i, 0] - x[first, 0]))
    assert idx[1] == far
    covered = x[idx, 0]
    rest = [i for i in range(5) if i not in idx[:2]]
    third = max(rest, key=lambda i: min(abs(x[i, 0] - c) for c in covered[:2]))
    assert idx[2] == third


def test_mean_distance_start_picks_the_outlier_first():
    x = torch.zeros(50, 2)
    x[:, 0] = torch.linspace(0, 1, 50)
    x[17] = torch.tensor([40.0, 0.0])
    assert greedy_coreset(x, 1, n_starts=10).tolist() == [17]
    assert reference_greedy_coreset(x, 1, n_starts=10).tolist() == [17]


def test_projection_is_seeded_and_shaped():
    x = torch.randn(10, 300)
    a, b, c = random_projection(x, 16, 1), random_projection(x, 16, 1), random_projection(x, 16, 2)
    assert a.shape == (10, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(random_projection(x, None), x) and random_projection(x, 512).shape[1] == 300


def test_sizes_and_bad_input():
    assert coreset_size(100, 0.1) == 10 and coreset_size(5, 0.01) == 1 and coreset_size(5, 2) == 5
    x = torch.randn(20, 4)
    assert sorted(greedy_coreset(x, 50).tolist()) == list(range(20))  # clipped to N
    with pytest.raises(ValueError):
        greedy_coreset(x, 0)


def test_explicit_first_point():
    x = _clustered(800, 16)
    ours = greedy_coreset(x, 40, projection_dim=None, first=123, pool=64, dtype=torch.float64)
    ref = reference_greedy_coreset(x, 40, first=123, dtype=torch.float64)
    assert ours[0] == 123 and torch.equal(ours, ref)
