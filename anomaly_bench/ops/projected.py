"""Exact nearest-neighbour search that skips most of the bank with a projected lower bound.

For an orthonormal basis V (D x m), ``|V^T (q - b)|^2 <= |q - b|^2`` for every query q and
bank entry b: the distance between projections bounds the true distance from below.
Patch features concentrate their variance in few directions, so with V the bank's top m
principal directions the bound is tight: the entry nearest in the projection is usually
the true nearest or close to it, and every entry whose bound exceeds that entry's exact
distance is skipped. The answer is the exact nearest neighbour: an entry is skipped only
when its bound, less a margin covering float32 rounding, exceeds a distance already found.

The projection size m is chosen per bank with a cost model: on a sample of bank rows used
as queries, the number of entries left to check is counted for each m in ``DIMS``; the m
of lowest estimated cost (the bound's product and its passes over the bound matrix, plus
the exact checks) wins, and a bank the bound prunes too little for, or of too few
dimensions for the bound to be much cheaper than the distance, is searched by brute force
(``ProjectedSearch.build`` returns None).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from anomaly_bench.ops.matmul import pairwise_sqdist, sqnorm

DIMS = (16, 32, 64, 128, 256)
_EPS = float(torch.finfo(torch.float32).eps)
#: Cost of one candidate entry checked exactly, per dimension, in units of one multiply-add
#: of the bound's matrix product (gathered rows, not a GEMM; measured on the CPU).
_GATHER_COST = 64.0
#: Cost per bound value beyond its m multiply-adds, in the same units: writing the product
#: (a product with m <= 128 is limited by its output, not its arithmetic), the row minimum
#: and the comparison with the threshold, about 32 each (measured on the CPU). It is why
#: a bank of few dimensions (d = 256: 256 multiply-adds per entry by brute force) gains
#: little or nothing from the bound, however tight.
_PASS_COST = 96.0
#: Candidate pairs whose exact distances are computed at once (bounds temporary memory).
_PAIRS = 4096
#: Largest bound matrix (query rows x bank entries) of one chunk of queries.
_BOUND_ELEMENTS = 2**22


@dataclass
class ProjectedSearch:
    """Bank projections for :meth:`nearest`; build with :meth:`build`."""

    mean: torch.Tensor  # (D,)
    centred: torch.Tensor  # (N, D) bank - mean
    centred_sq: torch.Tensor  # (N,) |bank - mean|^2
    basis: torch.Tensor  # (D, m) orthonormal columns
    proj: torch.Tensor  # (N, m) bank projections
    proj_sq: torch.Tensor  # (N,)
    scaled: torch.Tensor = None  # type: ignore[assignment]  # (N, m + 1): [-2 proj, proj_sq]

    def __post_init__(self) -> None:
        if self.scaled is None:
            self.scaled = torch.cat([self.proj * -2, self.proj_sq.unsqueeze(1)], 1)

    @classmethod
    def build(cls, centred: torch.Tensor, mean: torch.Tensor, sample: int = 256, seed: int = 0,
              max_fraction: float = 0.5) -> ProjectedSearch | None:
        """Projections of a bank given as ``centred`` rows (N, D) and their ``mean``, with the
        cheapest m; None when the estimate says brute force costs less than
        ``1 / max_fraction`` times it (small or unstructured banks)."""
        n, d = centred.shape
        if n < 2 * sample or d < 2 * DIMS[0]:
            return None
        c64 = centred.double()
        c64 -= c64.mean(dim=0)  # principal directions of the rows, whatever the given mean
        _, vecs = torch.linalg.eigh(c64.T @ c64)  # ascending eigenvalues
        del c64
        full = vecs.flip(1)[:, :min(max(DIMS), d)].to(centred.dtype)  # (D, m_max)
        proj = centred @ full  # (N, m_max)
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randperm(n, generator=gen)[:sample].to(centred.device)
        exact = pairwise_sqdist(centred[rows], centred)
        exact[torch.arange(sample, device=centred.device), rows] = float("inf")
        nearest = exact.min(dim=1).values  # leave-one-out nearest distances
        best_m, best_cost = None, max_fraction * n * d
        for m in (m for m in DIMS if m <= full.shape[1]):
            bound = pairwise_sqdist(proj[rows, :m], proj[:, :m])
            pairs = float((bound <= nearest.unsqueeze(1)).sum()) / sample
            cost = m * (d + n) + _PASS_COST * n + _GATHER_COST * pairs * d
            if cost < best_cost:
                best_m, best_cost = m, cost
        if best_m is None:
            return None
        p = proj[:, :best_m].contiguous()
        return cls(mean, centred, sqnorm(centred), full[:, :best_m].contiguous(), p, sqnorm(p))

    @property
    def dims(self) -> int:
        return int(self.basis.shape[1])

    def nearest(self, query: torch.Tensor, rows: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact squared distance to the nearest bank entry and its index, per query row.

        Candidates' distances are summed squared differences (no cancellation); among
        entries at the same distance the smallest index wins, as with ``argmin``. Queries
        go in chunks of ``rows`` (default: a bound matrix of at most ``_BOUND_ELEMENTS``).
        """
        n, d = self.centred.shape
        rows = rows or max(64, min(1024, _BOUND_ELEMENTS // n))
        dist = torch.empty(query.shape[0], device=query.device, dtype=query.dtype)
        index = torch.empty(query.shape[0], device=query.device, dtype=torch.long)
        proj_scale = float(self.proj_sq.max())
        for r0 in range(0, query.shape[0], rows):
            q = query[r0:r0 + rows] - self.mean
            qp = q @ self.basis
            qp_sq = sqnorm(qp)
            # the bound less |qp|^2, i.e. |bp|^2 - 2 qp.bp, as one plain product
            bound = torch.cat([qp, torch.ones_like(qp[:, :1])], 1) @ self.scaled.T
            first = bound.min(dim=1).indices  # (min with indices: ~4x argmin's speed)
            upper = (q - self.centred[first]).square_().sum(1)
            # worst-case float32 rounding: the bound's expansion over m dimensions, the
            # distance's sum over D
            margin = 2 * (self.dims + 1) * _EPS * (qp_sq + proj_scale) + 2 * d * _EPS * upper
            qi, bi = _at_most(bound, upper + margin - qp_sq)
            keep = bi != first[qi]  # the first candidate's distance is known
            qi, bi = qi[keep], bi[keep]
            found = [(q[qi[p0:p0 + _PAIRS]] - self.centred[bi[p0:p0 + _PAIRS]]).square_().sum(1)
                     for p0 in range(0, qi.numel(), _PAIRS)]
            dd = torch.cat(found) if found else upper[:0]
            best = upper.clone().scatter_reduce_(0, qi, dd, "amin")
            idx = torch.where(upper == best, first, n)
            won = dd == best[qi]
            idx.scatter_reduce_(0, qi[won], bi[won], "amin")
            dist[r0:r0 + rows], index[r0:r0 + rows] = best, idx
        return dist, index


def _at_most(values: torch.Tensor, limit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the entries of ``values`` (R, N) at most their row's
    ``limit``. On the CPU the comparison and the index extraction run in NumPy
    (vectorised; ``torch.nonzero`` took three times as long on 4 M entries)."""
    if values.device.type == "cpu":
        flat = torch.from_numpy(np.flatnonzero(values.numpy() <= limit.numpy()[:, None]))
        return flat // values.shape[1], flat % values.shape[1]
    return (values <= limit.unsqueeze(1)).nonzero(as_tuple=True)
