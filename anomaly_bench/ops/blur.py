"""Separable Gaussian blur of anomaly maps, batched on the maps' device."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, device: torch.device | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``int(4 * sigma + 0.5)`` (scipy's truncate=4)."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur (B, H, W) or (B, 1, H, W) maps with a Gaussian of std ``sigma`` pixels.

    Borders are reflected (torch ``reflect``, as anomalib's blur does); a map smaller than
    the kernel radius falls back to edge replication. ``sigma <= 0`` returns the input.
    """
    if sigma <= 0:
        return maps
    squeeze = maps.dim() == 3
    x = maps.unsqueeze(1) if squeeze else maps
    k = gaussian_kernel1d(sigma, x.device, x.dtype)
    r = k.numel() // 2
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    x = F.pad(x, (r, r, r, r), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x.squeeze(1) if squeeze else x
