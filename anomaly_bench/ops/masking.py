"""Which patch tokens a masked encoder keeps: uniform random, or split around salient boxes.

MAE's masking keeps ``K = int(N * (1 - ratio))`` of the N patches of every image, the
ones with the smallest of N uniform noise values, in increasing noise order (its
``ids_shuffle[:, :K]``). The saliency-guided variant fixes how many of the ``M = N - K``
masked patches lie inside the salient boxes: ``round(M * split)`` for a given split, or
``round(M * n_in / N)`` (the boxes' share of the patches) for the proportional split,
bounded by the patches there are inside and outside; within each side the masked ones
are again those of largest noise. Both are sorts on (B, N): no loop over images.
"""

from __future__ import annotations

import torch


def kept_count(n: int, ratio: float) -> int:
    """Patches kept of ``n`` at mask ``ratio`` (MAE's ``int(n * (1 - ratio))``)."""
    return int(n * (1 - ratio))


def random_keep(noise: torch.Tensor, n_keep: int) -> torch.Tensor:
    """(B, n_keep) indices of the smallest values of ``noise`` (B, N), in increasing order."""
    return noise.argsort(dim=1)[:, :n_keep]


def guided_keep(noise: torch.Tensor, inside: torch.Tensor, n_keep: int,
                split: float | None) -> torch.Tensor:
    """(B, n_keep) kept indices with the masked patches split between ``inside`` (B, N
    bool) and the rest: a fraction ``split`` inside, or proportionally to the inside share
    when ``split`` is None. Kept indices come in increasing noise order."""
    b, n = noise.shape
    m = n - n_keep
    n_in = inside.sum(1)
    want = (m * n_in / n) if split is None else torch.full_like(n_in, m * split,
                                                                 dtype=torch.float64)
    m_in = torch.minimum(want.double().round().long(), n_in)
    m_in = torch.maximum(m_in, m - (n - n_in))  # the rest must fit outside
    # rank of every patch by decreasing noise within its side: the top m_in inside and
    # the top m - m_in outside are masked
    rank = torch.empty_like(noise, dtype=torch.long)
    order = (-noise + 2.0 * (~inside)).argsort(dim=1)  # inside first, each side by -noise
    rank.scatter_(1, order, torch.arange(n, device=noise.device).expand(b, -1).contiguous())
    side_rank = torch.where(inside, rank, rank - n_in[:, None])
    masked = torch.where(inside, side_rank < m_in[:, None], side_rank < (m - m_in)[:, None])
    return (noise + 2.0 * masked).argsort(dim=1)[:, :n_keep]
