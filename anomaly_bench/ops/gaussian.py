"""Per-position multivariate Gaussians: streaming fit and batched Mahalanobis distance.

PaDiM models every feature-map position with its own Gaussian. The fit streams over
the training set, merging per-batch means and centred scatter matrices (Chan et al.'s
parallel update), so no more than one batch of features is held at a time and the
result equals the two-pass ``torch.cov`` estimate up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F


class GaussianAccumulator:
    """Running mean and centred scatter of (B, C, P) features, one Gaussian per position P."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None  # (P, C)
        self.scatter: torch.Tensor | None = None  # (P, C, C)

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features shaped (B, C, P)."""
        x = features.permute(2, 0, 1).float()  # (P, B, C)
        b = x.shape[1]
        mean_b = x.mean(dim=1)  # (P, C)
        centred = x - mean_b.unsqueeze(1)
        scatter_b = centred.transpose(1, 2) @ centred  # (P, C, C)
        if self.mean is None:
            self.n, self.mean, self.scatter = b, mean_b, scatter_b
            return
        assert self.scatter is not None
        n_a = self.n
        n = n_a + b
        delta = mean_b - self.mean  # (P, C)
        self.scatter += scatter_b
        self.scatter.baddbmm_(delta.unsqueeze(2), delta.unsqueeze(1), alpha=n_a * b / n)
        self.mean += delta * (b / n)
        self.n = n

    def finalize(self, reg: float, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mean (C, P), inverse covariance (P, C, C)).

        The covariance is the unbiased estimate plus ``reg * I``. The scatter buffer is
        inverted in place chunk by chunk to keep peak memory at one (P, C, C) tensor.
        """
        if self.mean is None or self.scatter is None or self.n < 2:
            raise ValueError("a Gaussian needs at least two training samples")
        cov = self.scatter
        cov /= self.n - 1
        eye = torch.eye(cov.shape[-1], device=cov.device, dtype=cov.dtype)
        for start in range(0, cov.shape[0], chunk):
            block = cov[start : start + chunk]
            block += reg * eye
            chol, info = torch.linalg.cholesky_ex(block)
            if bool((info > 0).any()):
                block.copy_(torch.linalg.inv(block))
            else:
                block.copy_(torch.cholesky_inverse(chol))
        mean = self.mean.t().contiguous()
        self.mean = self.scatter = None
        return mean, cov


def mahalanobis(features: torch.Tensor, mean: torch.Tensor, inv_cov: torch.Tensor,
                chunk: int = 512) -> torch.Tensor:
    """Mahalanobis distance of (B, C, P) features to per-position Gaussians -> (B, P).

    ``mean`` is (C, P) and ``inv_cov`` (P, C, C). Positions are processed in chunks so the
    (P, B, C) intermediate stays small.
    """
    x = features.float().permute(2, 0, 1).contiguous()  # (P, B, C)
    delta = x - mean.t().unsqueeze(1)
    out = torch.empty(x.shape[0], x.shape[1], device=x.device, dtype=x.dtype)
    for start in range(0, x.shape[0], chunk):
        d = delta[start : start + chunk]
        out[start : start + chunk] = ((d @ inv_cov[start : start + chunk]) * d).sum(-1)
    return out.clamp_min_(0).sqrt_().t()


def nearest_index(src: tuple[int, int], dst: tuple[int, int],
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """(dst_h * dst_w,) flat index of the ``src`` cell each ``dst`` cell copies.

    The gather equals ``F.interpolate(x, size=dst, mode="nearest")`` for any sizes (it is
    computed by that very call on an index grid).
    """
    return _nearest_index(tuple(src), tuple(dst), str(device))


@lru_cache(maxsize=64)
def _nearest_index(src: tuple[int, int], dst: tuple[int, int], device: str) -> torch.Tensor:
    grid = torch.arange(src[0] * src[1], dtype=torch.float64).view(1, 1, *src)
    idx = F.interpolate(grid, size=dst, mode="nearest").round().long().flatten()
    return idx.to(device)


@dataclass
class LowRankGaussians:
    """Per-position Gaussians of a feature pyramid fitted from N samples, N <= channels.

    Level ``i`` holds ``c_i`` channels on its own ``h_i x w_i`` grid; the Gaussians live on
    the finest grid ``grid``, where every level is read by nearest-neighbour upsampling.
    ``means[i]`` is (h_i * w_i, c_i) float64, ``centred[i]`` the centred samples
    (h_i * w_i, N, c_i) float64, ``whiten`` (P, N, N) float64 the transposed inverse
    ``L^-T`` of the Cholesky factor of each fine position's ``M = reg (N - 1) I + X X^T``,
    so that ``|L^-1 v|`` of a row vector ``v`` is one matrix product ``|v L^-T|``.
    """

    means: list[torch.Tensor]
    centred: list[torch.Tensor]
    whiten: torch.Tensor
    grid: tuple[int, int]
    reg: float


def _positions_first(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """(p, n, c) float64 from (n_j, c, h, w) parts stacked along n: one strided copy each."""
    n = sum(f.shape[0] for f in parts)
    c, h, w = parts[0].shape[1:]
    out = torch.empty(h * w, n, c, device=parts[0].device, dtype=torch.float64)
    start = 0
    for f in parts:
        out[:, start:start + f.shape[0]].copy_(f.flatten(2).permute(2, 0, 1))
        start += f.shape[0]
    return out


def level_stats(parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pyramid level's share of :func:`lowrank_fit` from its (n_j, c, h, w) batches.

    Returns float64 (mean (p, c), centred samples X (p, N, c), Gram matrices X X^T (p, N, N)).
    """
    x = _positions_first(parts)  # (p, N, c)
    mean = x.mean(dim=1)
    x -= mean.unsqueeze(1)
    return mean, x, torch.bmm(x, x.transpose(1, 2))


def _level_index(shape: tuple[int, int], grid: tuple[int, int],
                 device: torch.device | str) -> torch.Tensor | None:
    """:func:`nearest_index` of a level on ``grid``; None for the finest level itself."""
    return None if tuple(shape) == tuple(grid) else nearest_index(shape, grid, device)


def _level_rows(x: torch.Tensor, index: torch.Tensor | None, start: int, stop: int
                ) -> torch.Tensor:
    """Fine positions ``start:stop`` read from a level's (p, ...) tensor: a view of the
    finest level (a gather would copy it whole, the largest of the levels), a gather of a
    coarser one."""
    return x[start:stop] if index is None else x.index_select(0, index[start:stop])


def _summed_rows(levels: Sequence[torch.Tensor], index: Sequence[torch.Tensor | None],
                 start: int, stop: int, plus: torch.Tensor | None = None) -> torch.Tensor:
    """The levels' values on fine positions ``start:stop`` summed, level 0 first and
    ``plus`` (broadcast) after it: a new tensor, never written into a level's own (level 0
    alone comes back as its rows, to read)."""
    terms = [_level_rows(x, idx, start, stop) for x, idx in zip(levels, index, strict=True)]
    if plus is not None:
        terms.insert(1, plus)
    total = terms[0]
    for k, term in enumerate(terms[1:]):
        total = total + term if k == 0 else total.add_(term)
    return total


def whitening(grams: Sequence[torch.Tensor], shapes: Sequence[tuple[int, int]],
              grid: tuple[int, int], reg: float, chunk: int = 512) -> torch.Tensor:
    """``L^-T`` (P, N, N) per fine position, L the Cholesky factor of ``reg (N-1) I + sum G``.

    ``grams[i]`` (p_i, N, N) lives on level grid ``shapes[i]`` and is gathered per position.
    """
    n, device = grams[0].shape[-1], grams[0].device
    index = [_level_index(shape, grid, device) for shape in shapes]
    p = grid[0] * grid[1]
    out = torch.empty(p, n, n, device=device, dtype=torch.float64)
    eye = torch.eye(n, device=device, dtype=torch.float64)
    ridge = eye * (reg * (n - 1))
    for start in range(0, p, chunk):
        stop = min(start + chunk, p)
        m = _summed_rows(grams, index, start, stop, plus=ridge)
        chol = torch.linalg.cholesky(m)
        inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
        out[start:stop] = inv.transpose(1, 2)
    return out


def lowrank_fit(levels: Sequence[torch.Tensor | Sequence[torch.Tensor]], grid: tuple[int, int],
                reg: float, chunk: int = 512) -> LowRankGaussians:
    """Fit per-position Gaussians from N samples without forming C x C matrices.

    With X the centred samples of a position (N, C), the regularised covariance is
    ``reg * I + X^T X / (N - 1)``, a rank-(N-1) update of ``reg * I``. By the Woodbury
    identity its inverse is ``(I - X^T M^-1 X) / reg`` with the small matrix
    ``M = reg (N - 1) I + X X^T`` (N x N), so the Mahalanobis distance is exact while the
    fit costs O(N^2 C) per position instead of O(N C^2 + C^3).

    ``levels`` are the samples' feature maps (N, c_i, h_i, w_i) (or lists of such batches
    along N), the concatenation of their nearest-upsampled channels on ``grid`` being the
    modelled vector. ``X X^T`` is a sum over channels, so each level contributes its own
    Gram matrix (:func:`level_stats`), computed once per cell of its native grid (a coarse
    level upsampled 4x costs a quarter) and gathered per fine position (:func:`whitening`);
    nothing of size (P, N, C) is formed.
    """
    parts = [[lv] if isinstance(lv, torch.Tensor) else list(lv) for lv in levels]
    if sum(f.shape[0] for f in parts[0]) < 2:
        raise ValueError("a Gaussian needs at least two training samples")
    stats = [level_stats(level) for level in parts]
    shapes = [tuple(level[0].shape[-2:]) for level in parts]
    whiten = whitening([g for _, _, g in stats], shapes, grid, reg, chunk)
    return LowRankGaussians([m for m, _, _ in stats], [x for _, x, _ in stats], whiten,
                            tuple(grid), reg)


def level_cross(features: torch.Tensor, mean: torch.Tensor, centred: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One level's share of :func:`lowrank_mahalanobis` for (B, c, h, w) features.

    Returns float64 ``X delta`` (p, B, N) and ``|delta|^2`` (p, B) per level cell.
    """
    delta = _positions_first([features])  # (p, B, c)
    delta -= mean.unsqueeze(1)
    return torch.bmm(delta, centred.transpose(1, 2)), torch.linalg.vecdot(delta, delta)


def lowrank_distance(cross: Sequence[torch.Tensor], sq: Sequence[torch.Tensor],
                     shapes: Sequence[tuple[int, int]], whiten: torch.Tensor,
                     grid: tuple[int, int], reg: float, chunk: int = 512) -> torch.Tensor:
    """Mahalanobis distances (B, P) from the levels' :func:`level_cross` shares.

    ``d^2 = (|delta|^2 - |L^-1 X delta|^2) / reg``, evaluated in float64 because the two
    terms can be close.
    """
    device = whiten.device
    index = [_level_index(shape, grid, device) for shape in shapes]
    p = whiten.shape[0]
    out = torch.empty(p, cross[0].shape[1], device=device, dtype=torch.float64)
    for start in range(0, p, chunk):
        stop = min(start + chunk, p)
        b = _summed_rows(cross, index, start, stop)  # (p, B, N)
        s = _summed_rows(sq, index, start, stop)
        c = torch.bmm(b, whiten[start:stop])  # rows: (L^-1 X delta)^T
        out[start:stop] = (s - torch.linalg.vecdot(c, c)) / reg
    return out.clamp_min_(0).sqrt_().t()


def lowrank_mahalanobis(levels: Sequence[torch.Tensor], model: LowRankGaussians,
                        chunk: int = 512) -> torch.Tensor:
    """Mahalanobis distance (B, P) of feature pyramids (B, c_i, h_i, w_i) under ``model``.

    Both terms of the distance are sums over channels, so each level's share is computed on
    its native grid (:func:`level_cross`) and gathered per fine position.
    """
    shares = [level_cross(f, m, x) for f, m, x in zip(levels, model.means, model.centred,
                                                       strict=True)]
    dist = lowrank_distance([c for c, _ in shares], [q for _, q in shares],
                            [tuple(f.shape[-2:]) for f in levels], model.whiten, model.grid,
                            model.reg, chunk)
    return dist.to(levels[0].dtype)
