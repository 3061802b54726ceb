"""Per-position multivariate Gaussians: streaming fit and batched Mahalanobis distance.

PaDiM models every feature-map position with its own Gaussian. The fit streams over
the training set, merging per-batch means and centred scatter matrices (Chan et al.'s
parallel update), so no more than one batch of features is held at a time and the
result equals the two-pass ``torch.cov`` estimate up to float rounding.
"""

from __future__ import annotations

import torch


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
    x = features.float().permute(2, 0, 1)  # (P, B, C)
    delta = x - mean.t().unsqueeze(1)
    out = torch.empty(x.shape[0], x.shape[1], device=x.device, dtype=x.dtype)
    for start in range(0, x.shape[0], chunk):
        d = delta[start : start + chunk]
        out[start : start + chunk] = ((d @ inv_cov[start : start + chunk]) * d).sum(-1)
    return out.clamp_min_(0).sqrt_().t()
