"""Separable Gaussian blur of anomaly maps, batched on the maps' device."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, device: torch.device | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``int(4 * sigma + 0.5)`` (scipy's truncate=4)."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


@lru_cache(maxsize=32)
def _reflect_operator(n: int, sigma: float, device: str, dtype: torch.dtype) -> torch.Tensor:
    """(n, n) matrix K with ``x @ K`` = 1-D Gaussian blur of rows with reflected borders."""
    k = gaussian_kernel1d(sigma, dtype=torch.float64)
    r = k.numel() // 2
    src = torch.arange(n).unsqueeze(1) + torch.arange(-r, r + 1).unsqueeze(0)  # (n, taps)
    src = src.abs()
    src = torch.where(src >= n, 2 * (n - 1) - src, src)
    op = torch.zeros(n, n, dtype=torch.float64)
    op.index_put_((src.flatten(), torch.arange(n).repeat_interleave(k.numel())),
                  k.repeat(n), accumulate=True)
    return op.to(device=device, dtype=dtype)


#: Up to this size a blur is two dense products with banded operators (compute-bound and
#: fast); larger maps use two separable convolutions, whose cost grows only linearly.
DENSE_MAX = 512


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur (B, H, W) or (B, 1, H, W) maps with a Gaussian of std ``sigma`` pixels.

    Borders are reflected (torch ``reflect``, as anomalib's blur does); a map smaller than
    the kernel radius falls back to edge replication. ``sigma <= 0`` returns the input.
    """
    if sigma <= 0:
        return maps
    squeeze = maps.dim() == 3
    x = maps.unsqueeze(1) if squeeze else maps
    r = int(4.0 * sigma + 0.5)
    h, w = x.shape[-2:]
    if min(h, w) > r and max(h, w) <= DENSE_MAX:
        dev = str(x.device)
        rows = _reflect_operator(w, float(sigma), dev, x.dtype)
        cols = _reflect_operator(h, float(sigma), dev, x.dtype)
        x = cols.T @ (x @ rows)
        return x.squeeze(1) if squeeze else x
    k = gaussian_kernel1d(sigma, x.device, x.dtype)
    mode = "reflect" if min(h, w) > r else "replicate"
    x = F.pad(x, (r, r, r, r), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x.squeeze(1) if squeeze else x
