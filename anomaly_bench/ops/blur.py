"""Separable Gaussian blur of anomaly maps, batched on the maps' device.

Two border conventions are offered (``border=``), named as in ``scipy.ndimage``:

- ``mirror`` (``d c b | a b c d | c b a``, the edge pixel not repeated): torch's and
  kornia's ``reflect`` padding, which anomalib's blur uses; the default.
- ``reflect`` (``c b a | a b c d | d c b``, the edge pixel repeated): the default mode of
  ``scipy.ndimage.gaussian_filter``, which the official PatchCore code blurs with.

A map no larger than the kernel radius in some direction is padded by edge replication
whatever the border (a single reflection would not cover the kernel).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

#: The border conventions of :func:`gaussian_blur`, named as scipy.ndimage's modes.
BORDERS = ("mirror", "reflect")


def gaussian_kernel1d(sigma: float, device: torch.device | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``int(4 * sigma + 0.5)`` (scipy's truncate=4)."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def border_index(src: torch.Tensor, n: int, border: str) -> torch.Tensor:
    """Indices into ``0..n-1`` read for positions ``src`` (within ``n`` of the edges).

    ``mirror`` reflects about the edge pixel, ``reflect`` about the edge itself (the
    pixel repeated), ``replicate`` repeats the edge pixel.
    """
    if border == "mirror":
        src = src.abs()
        return torch.where(src >= n, 2 * (n - 1) - src, src)
    if border == "reflect":
        src = torch.where(src < 0, -src - 1, src)
        return torch.where(src >= n, 2 * n - 1 - src, src)
    if border == "replicate":
        return src.clamp(0, n - 1)
    raise ValueError(f"border={border!r} is not one of {', '.join(BORDERS)}.")


@lru_cache(maxsize=32)
def _blur_operator(n: int, sigma: float, border: str, device: str,
                   dtype: torch.dtype) -> torch.Tensor:
    """(n, n) matrix K with ``x @ K`` = 1-D Gaussian blur of rows with ``border``."""
    k = gaussian_kernel1d(sigma, dtype=torch.float64)
    r = k.numel() // 2
    src = torch.arange(n).unsqueeze(1) + torch.arange(-r, r + 1).unsqueeze(0)  # (n, taps)
    src = border_index(src, n, border)
    op = torch.zeros(n, n, dtype=torch.float64)
    op.index_put_((src.flatten(), torch.arange(n).repeat_interleave(k.numel())),
                  k.repeat(n), accumulate=True)
    return op.to(device=device, dtype=dtype)


#: Up to this size a blur is two dense products with banded operators (compute-bound and
#: fast); larger maps use two separable convolutions, whose cost grows only linearly.
DENSE_MAX = 512


def _pad(x: torch.Tensor, r: int, border: str) -> torch.Tensor:
    """``x`` (B, 1, H, W) padded by ``r`` on every side, gathered by index (any device)."""
    h, w = x.shape[-2:]
    rows = border_index(torch.arange(-r, h + r, device=x.device), h, border)
    cols = border_index(torch.arange(-r, w + r, device=x.device), w, border)
    return x.index_select(-2, rows).index_select(-1, cols)


def gaussian_blur(maps: torch.Tensor, sigma: float, border: str = "mirror") -> torch.Tensor:
    """Blur (B, H, W) or (B, 1, H, W) maps with a Gaussian of std ``sigma`` pixels.

    ``border``: ``mirror`` (torch ``reflect`` padding, as anomalib's blur) or ``reflect``
    (scipy.ndimage's default, as the official PatchCore code); see the module docstring.
    A map no larger than the kernel radius falls back to edge replication. ``sigma <= 0``
    returns the input.
    """
    if border not in BORDERS:
        raise ValueError(f"border={border!r} is not one of {', '.join(BORDERS)}.")
    if sigma <= 0:
        return maps
    squeeze = maps.dim() == 3
    x = maps.unsqueeze(1) if squeeze else maps
    r = int(4.0 * sigma + 0.5)
    h, w = x.shape[-2:]
    if min(h, w) > r and max(h, w) <= DENSE_MAX:
        dev = str(x.device)
        rows = _blur_operator(w, float(sigma), border, dev, x.dtype)
        cols = _blur_operator(h, float(sigma), border, dev, x.dtype)
        x = cols.T @ (x @ rows)
        return x.squeeze(1) if squeeze else x
    k = gaussian_kernel1d(sigma, x.device, x.dtype)
    x = _pad(x, r, border if min(h, w) > r else "replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x.squeeze(1) if squeeze else x
