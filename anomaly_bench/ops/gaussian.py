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
    x = features.float().permute(2, 0, 1).contiguous()  # (P, B, C)
    delta = x - mean.t().unsqueeze(1)
    out = torch.empty(x.shape[0], x.shape[1], device=x.device, dtype=x.dtype)
    for start in range(0, x.shape[0], chunk):
        d = delta[start : start + chunk]
        out[start : start + chunk] = ((d @ inv_cov[start : start + chunk]) * d).sum(-1)
    return out.clamp_min_(0).sqrt_().t()


def lowrank_fit(embeddings: torch.Tensor, reg: float,
                chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit per-position Gaussians from N < C samples without forming C x C matrices.

    With X the centred samples of a position (N, C), the regularised covariance is
    ``reg * I + X^T X / (N - 1)``, a rank-(N-1) update of ``reg * I``. By the Woodbury
    identity its inverse is ``(I - X^T M^-1 X) / reg`` with the small matrix
    ``M = reg (N - 1) I + X X^T`` (N x N), so the Mahalanobis distance is exact while the
    fit costs O(N^2 C) per position instead of O(N C^2 + C^3).

    ``embeddings`` is (N, C, P). Returns (mean (C, P), X (P, N, C) float32,
    Cholesky factor of M (P, N, N) float64).
    """
    n = embeddings.shape[0]
    if n < 2:
        raise ValueError("a Gaussian needs at least two training samples")
    mean = embeddings.mean(dim=0)
    centred = (embeddings - mean).permute(2, 0, 1).contiguous()  # (P, N, C)
    chol = torch.empty(centred.shape[0], n, n, device=centred.device, dtype=torch.float64)
    eye = torch.eye(n, device=centred.device, dtype=torch.float64) * (reg * (n - 1))
    for start in range(0, centred.shape[0], chunk):
        x = centred[start : start + chunk].double()
        chol[start : start + chunk] = torch.linalg.cholesky(x @ x.transpose(1, 2) + eye)
    return mean, centred, chol


def lowrank_mahalanobis(features: torch.Tensor, mean: torch.Tensor, centred: torch.Tensor,
                        chol: torch.Tensor, reg: float, chunk: int = 256) -> torch.Tensor:
    """Mahalanobis distance (B, P) of (B, C, P) features under :func:`lowrank_fit` Gaussians.

    ``d^2 = (|delta|^2 - |L^-1 X delta|^2) / reg``, evaluated in float64 because the two
    terms can be close.
    """
    # one transposition to (P, B, C); per-chunk copies of a strided view cost 1.6x more
    delta = (features.float() - mean).permute(2, 0, 1).contiguous()
    out = torch.empty(delta.shape[0], delta.shape[1], device=delta.device, dtype=torch.float64)
    for start in range(0, delta.shape[0], chunk):
        d = delta[start : start + chunk].double()  # (p, B, C)
        b = torch.bmm(centred[start : start + chunk].double(), d.transpose(1, 2))  # (p, N, B)
        c = torch.linalg.solve_triangular(chol[start : start + chunk], b, upper=False)
        out[start : start + chunk] = (d.square().sum(2) - c.square().sum(1)) / reg
    return out.clamp_min_(0).sqrt_().t().to(features.dtype)
