"""Spectral-residual saliency (Hou & Zhang, CVPR 2007) and its salient boxes, batched.

The saliency of an image is what its log amplitude spectrum has beyond the locally
averaged one: ``S = |IFFT(exp(log|F| - box3(log|F|) + i arg F))|``, on the grey image
resized to 64 x 64, as OpenCV's ``StaticSaliencySpectralResidual`` computes it (a 3 x 3
box on the log amplitude, then a 5 x 5 Gaussian of sigma 8 on the magnitude, squared and
divided by its maximum). It runs on the images' device for a whole batch (FFTs, no
loops over images or pixels).

:func:`salient_boxes` thresholds a saliency map (Otsu's threshold per image, or a fixed
fraction of its maximum) and returns, per image, which cells of a grid lie inside the
bounding box of a connected salient region (8-connectivity): the regions are labelled by
propagating the largest index through each region (one batched 3 x 3 max-pool per step,
as many steps as the longest path inside a region), each label's box is a scatter of
row and column extremes, and a cell is inside when its centre lies in any box.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: The side of the grey image the spectrum is taken of (OpenCV's and the paper's 64).
SIDE = 64
#: Grey weights of RGB (ITU-R BT.601, OpenCV's ``COLOR_RGB2GRAY``).
GREY = (0.299, 0.587, 0.114)


def _gaussian_5x5(sigma: float, device: torch.device) -> torch.Tensor:
    x = torch.arange(5, device=device, dtype=torch.float64) - 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def _filter(x: torch.Tensor, k1d: torch.Tensor) -> torch.Tensor:
    """Separable filter of (B, H, W) maps with OpenCV's default border (reflect-101)."""
    r = k1d.numel() // 2
    y = F.pad(x[:, None], (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k1d.view(1, 1, 1, -1))
    return F.conv2d(y, k1d.view(1, 1, -1, 1))[:, 0]


def spectral_residual(images: torch.Tensor) -> torch.Tensor:
    """(B, 64, 64) saliency in [0, 1] of (B, 3, H, W) RGB images with values in [0, 1]."""
    w = torch.tensor(GREY, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    grey = (images.float() * w).sum(1, keepdim=True)
    grey = F.interpolate(grey, size=(SIDE, SIDE), mode="bilinear", align_corners=False,
                         antialias=False)[:, 0]
    spec = torch.fft.fft2(grey.double())
    log_amp = torch.log(spec.abs().clamp_min(1e-12))
    box = torch.full((3,), 1 / 3, device=images.device, dtype=torch.float64)
    residual = log_amp - _filter(log_amp, box)
    back = torch.fft.ifft2(torch.exp(torch.complex(residual, spec.angle())))
    mag = _filter(back.abs().float(), _gaussian_5x5(8.0, images.device)) ** 2
    return mag / mag.flatten(1).amax(1).clamp_min(1e-30).view(-1, 1, 1)


def otsu_threshold(maps: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """(B,) Otsu threshold of (B, H, W) maps in [0, 1]: the histogram split (``bins``
    levels, as on an 8-bit image) of largest between-class variance."""
    b = maps.shape[0]
    levels = (maps.flatten(1).clamp(0, 1) * (bins - 1)).round().long()
    hist = torch.zeros(b, bins, device=maps.device).scatter_add_(
        1, levels, torch.ones_like(levels, dtype=torch.float32))
    p = hist / hist.sum(1, keepdim=True)
    idx = torch.arange(bins, device=maps.device, dtype=torch.float32)
    w0 = p.cumsum(1)
    mu = (p * idx).cumsum(1)
    total = mu[:, -1:]
    between = (total * w0 - mu) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    between = torch.where((w0 > 0) & (w0 < 1), between, torch.zeros_like(between))
    return (between.argmax(1).float() + 0.5) / (bins - 1)  # level t: values > t are salient


def component_labels(fg: torch.Tensor) -> torch.Tensor:
    """(B, H, W) long labels of the 8-connected regions of boolean ``fg`` (0 = background;
    a region's label is 1 + the largest flat index inside it)."""
    _, h, w = fg.shape
    idx = torch.arange(1, h * w + 1, device=fg.device, dtype=torch.float32).view(1, 1, h, w)
    mask = fg[:, None].float()
    labels = idx * mask
    while True:  # each step spreads the largest label one pixel further within a region
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * mask
        if torch.equal(grown, labels):
            return labels[:, 0].long()
        labels = grown


def salient_boxes(saliency: torch.Tensor, grid: tuple[int, int],
                  threshold: float | None = None) -> torch.Tensor:
    """(B, gh * gw) bool: grid cells (row-major) whose centre lies in the bounding box of
    a salient region of ``saliency`` (B, H, W). ``threshold``: a fraction of each map's
    maximum, or None for Otsu's threshold per map."""
    b, h, w = saliency.shape
    level = (otsu_threshold(saliency) if threshold is None
             else torch.full((b,), float(threshold), device=saliency.device))
    labels = component_labels(saliency > level.view(-1, 1, 1)).flatten(1)  # (B, H*W)
    n = h * w + 1
    rows = torch.arange(h, device=saliency.device).repeat_interleave(w).expand(b, -1)
    cols = torch.arange(w, device=saliency.device).repeat(h).expand(b, -1)
    big = torch.full((b, n), h * w, device=saliency.device, dtype=torch.long)
    r0 = big.scatter_reduce(1, labels, rows, "amin")
    c0 = big.scatter_reduce(1, labels, cols, "amin")
    r1 = torch.full_like(big, -1).scatter_reduce(1, labels, rows, "amax")
    c1 = torch.full_like(big, -1).scatter_reduce(1, labels, cols, "amax")
    valid = r1 >= 0
    valid[:, 0] = False  # the background label
    gh, gw = grid
    # centres of the grid cells in the saliency map's pixel coordinates
    cy = ((torch.arange(gh, device=saliency.device) + 0.5) * h / gh - 0.5).repeat_interleave(gw)
    cx = ((torch.arange(gw, device=saliency.device) + 0.5) * w / gw - 0.5).repeat(gh)
    inside = ((cy.view(1, -1, 1) >= r0[:, None] - 0.5) & (cy.view(1, -1, 1) <= r1[:, None] + 0.5)
              & (cx.view(1, -1, 1) >= c0[:, None] - 0.5)
              & (cx.view(1, -1, 1) <= c1[:, None] + 0.5) & valid[:, None])
    return inside.any(2)
