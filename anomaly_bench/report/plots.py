"""Per-category figures: ROC curve, score histogram, score scatter, anomaly-map overlays,
and rows of sample images.

Matplotlib with the Agg backend; every function writes one PNG and closes its figure.
Plots are 150 dpi RGB; the image grids are :data:`GRID_DPI` with a 256-colour palette.
Long titles wrap within the figure.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import MaxNLocator
from PIL import Image

from anomaly_bench.fsutil import atomic_open

NORMAL_COLOR, ANOMALY_COLOR = "#1f77b4", "#d62728"
#: Resolution of the image grids: a 1.5 in tile is 135 px.
GRID_DPI = 90


def _save(fig: plt.Figure, path: Path, dpi: int = 150, palette: bool = False) -> Path:
    """Write ``fig`` as a PNG: cropped to its content, or with ``palette`` as laid out and
    reduced to 256 colours.

    The palette is chosen per figure (Pillow's maximum-coverage quantiser, no dithering):
    a grid of photographs under colour maps stays close to its RGB rendering at about a
    quarter of the bytes or less.
    """
    try:
        if palette:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
            buf.seek(0)
            with Image.open(buf) as im:
                image = im.convert("RGB").quantize(256, method=Image.Quantize.MAXCOVERAGE,
                                                   dither=Image.Dither.NONE)
            with atomic_open(path, "wb", durable=False) as fh:
                image.save(fh, format="PNG", optimize=True)
        else:
            with atomic_open(path, "wb", durable=False) as fh:
                fig.savefig(fh, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_roc(path: Path, scores: np.ndarray, labels: np.ndarray, title: str) -> Path | None:
    """ROC curve of the image scores with its AUC; None when only one class is present."""
    from anomaly_bench.metrics.roc import auroc, roc_curve

    s, y = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels)
    auc = auroc(s, y)
    if auc is None:
        return None
    fpr, tpr, _ = roc_curve(s, y)
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot(fpr.numpy(), tpr.numpy(), color=ANOMALY_COLOR, lw=2, label=f"AUC = {auc:.4f}")
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate",
           ylabel="True positive rate")
    ax.set_title(f"ROC · {title}", fontsize=10, wrap=True)  # wrapped within the figure
    ax.legend(loc="lower right", frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _bins(scores: np.ndarray, max_bins: int = 30) -> np.ndarray:
    """Shared histogram bin edges: NumPy's ``auto`` rule (the larger of the Sturges and
    Freedman-Diaconis bin counts, e.g. 6 bins for 30 spread scores), at most ``max_bins``."""
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        return np.linspace(0.0, 1.0, 2)
    edges = np.histogram_bin_edges(finite, bins="auto")
    if len(edges) - 1 > max_bins:
        edges = np.linspace(edges[0], edges[-1], max_bins + 1)
    return edges


def plot_score_histogram(path: Path, scores: np.ndarray, labels: np.ndarray, title: str) -> Path:
    """Overlaid histograms of normal and anomalous image scores on shared bins (whole-image
    counts on the y axis)."""
    bins = _bins(scores)
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for lab, name, color in ((0, "normal", NORMAL_COLOR), (1, "anomalous", ANOMALY_COLOR)):
        sel = scores[labels == lab]
        if sel.size:
            ax.hist(sel, bins=bins, alpha=0.55, color=color, label=f"{name} (n={sel.size})")
    ax.set(xlabel="Image anomaly score", ylabel="Images")
    ax.set_title(f"Scores · {title}", fontsize=10, wrap=True)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_score_scatter(path: Path, scores: np.ndarray, labels: np.ndarray, title: str) -> Path:
    """Scores per test image (normal vs anomalous) with a marginal histogram on the right.

    The dashed line is the F1-optimal threshold when both classes are present.
    """
    fig = plt.figure(figsize=(6.4, 3.8))
    grid = fig.add_gridspec(1, 2, width_ratios=(4, 1), wspace=0.05)
    ax = fig.add_subplot(grid[0, 0])
    side = fig.add_subplot(grid[0, 1], sharey=ax)
    idx = np.arange(scores.size)
    bins = _bins(scores)
    for lab, name, color in ((0, "normal", NORMAL_COLOR), (1, "anomalous", ANOMALY_COLOR)):
        sel = labels == lab
        if sel.any():
            ax.scatter(idx[sel], scores[sel], s=14, color=color, alpha=0.8, label=name)
            side.hist(scores[sel], bins=bins, orientation="horizontal", color=color, alpha=0.55)
    threshold = _f1_threshold(scores, labels)
    if threshold is not None:
        for a in (ax, side):
            a.axhline(threshold, color="0.3", ls="--", lw=1)
        ax.text(0, threshold, " F1-optimal threshold", va="bottom", fontsize=7, color="0.3")
    ax.set(xlabel="Test image", ylabel="Image anomaly score")
    ax.set_title(f"Scores · {title}", fontsize=10, wrap=True)
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    side.set_xlabel("Images")
    side.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    side.tick_params(labelleft=False)
    side.grid(alpha=0.3)
    return _save(fig, path)


def _f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """The score threshold maximising F1 (predict anomalous when score >= threshold)."""
    if labels.min() == labels.max():
        return None
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(np.float64)
    tp = np.cumsum(y)
    fp = np.cumsum(1 - y)
    last = np.r_[s[1:] != s[:-1], True]  # keep the last point of a run of ties
    tp, fp, s = tp[last], fp[last], s[last]
    f1 = 2 * tp / (tp + fp + y.sum())
    return float(s[int(np.argmax(f1))])


def _grid_figure(width: float, height: float
                 ) -> tuple[plt.Figure, Callable[[float, float, float, float], plt.Axes]]:
    """A figure of ``width`` x ``height`` inches and a function placing an axes by its box in
    inches from the top left corner (grids laid out edge to edge, no subplot margins)."""
    fig = plt.figure(figsize=(width, height))

    def axes(x: float, y: float, w: float, h: float) -> plt.Axes:
        a = fig.add_axes((x / width, 1 - (y + h) / height, w / width, h / height))
        a.set_axis_off()
        return a

    return fig, axes


def plot_overlay_grid(path: Path, images: np.ndarray, maps: np.ndarray, masks: np.ndarray | None,
                      titles: list[str], vmin: float, vmax: float, max_items: int = 16,
                      title: str | None = None) -> Path:
    """Rows of (image, heat-map overlay) pairs with one colour scale and GT contours.

    Two pairs per row, each pair captioned with ``titles[k]``, the figure with ``title``
    (e.g. ``method · dataset/category``) above a one-line key, and a slim colour bar on
    the right. Written at :data:`GRID_DPI` with a 256-colour palette: 16 pairs of 224 px
    images take a few hundred kB.
    """
    n = min(len(images), max_items)
    rows = max(int(np.ceil(n / 2)), 1)
    tile, pair_gap, col_gap, head, row_gap, left = 1.5, 0.03, 0.15, 0.17, 0.04, 0.05
    grid_w = left + 4 * tile + 2 * pair_gap + col_gap
    bar_x, bar_w, right = grid_w + 0.08, 0.08, 0.5  # right: tick labels and bar label
    top = 0.45 if title else 0.25
    fig, axes = _grid_figure(bar_x + bar_w + right, top + rows * (head + tile + row_gap))
    height = fig.get_figheight()
    im = None
    for k in range(n):
        r, c = divmod(k, 2)
        x = left + c * (2 * tile + pair_gap + col_gap)
        y = top + r * (head + tile + row_gap) + head
        a_img, a_map = axes(x, y, tile, tile), axes(x + tile + pair_gap, y, tile, tile)
        a_img.imshow(images[k])
        a_img.set_title(titles[k], fontsize=7, loc="left", pad=2)
        a_map.imshow(images[k])
        im = a_map.imshow(maps[k], cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
        if masks is not None and masks[k].any():
            a_map.contour(masks[k].astype(float), levels=[0.5], colors="white", linewidths=0.8)
    centre = 0.5 * (left + grid_w) / fig.get_figwidth()
    if title:
        fig.text(centre, 1 - 0.06 / height, title, ha="center", va="top", fontsize=10,
                 fontweight="bold", wrap=True)
    key = "each pair: image, anomaly map (one colour scale)"
    if masks is not None:
        key += "; white: ground-truth outline"
    fig.text(centre, 1 - (top - 0.04) / height, key, ha="center", va="bottom", fontsize=7,
             color="0.35")
    if im is not None:
        cax = axes(bar_x, top + head, bar_w, rows * (head + tile + row_gap) - head - row_gap)
        cax.set_axis_on()
        bar = fig.colorbar(im, cax=cax)
        bar.solids.set_alpha(1.0)
        bar.set_label("anomaly score", fontsize=7)
        bar.ax.tick_params(labelsize=6, length=2)
    return _save(fig, path, dpi=GRID_DPI, palette=True)


def plot_sample_rows(path: Path, rows: Sequence[tuple[str, Sequence[np.ndarray], Sequence[str]]],
                     title: str, note: str = "") -> Path:
    """Rows of images under ``title`` and a one-line ``note``: each row is (label, images,
    one caption per image), e.g. the first training images as stored and after alignment,
    column by column.

    Images are RGB arrays (uint8), each fitted into a square tile; written like the
    overlay grid (:data:`GRID_DPI`, 256-colour palette).
    """
    cols = max((len(images) for _, images, _ in rows), default=0)
    tile, gap, head, label_w = 1.5, 0.04, 0.17, 0.25
    top = 0.5 if note else 0.35
    fig, axes = _grid_figure(label_w + max(cols, 1) * (tile + gap), top + len(rows) * (head + tile))
    for r, (label, images, captions) in enumerate(rows):
        y = top + r * (head + tile) + head
        fig.text(0.5 * label_w / fig.get_figwidth(), 1 - (y + tile / 2) / fig.get_figheight(),
                 label, rotation=90, ha="center", va="center", fontsize=8)
        for c, (image, caption) in enumerate(zip(images, captions, strict=True)):
            a = axes(label_w + c * (tile + gap), y, tile, tile)
            a.imshow(image)
            a.set_title(caption, fontsize=7, pad=2)
    height = fig.get_figheight()
    fig.text(0.5, 1 - 0.06 / height, title, ha="center", va="top", fontsize=10,
             fontweight="bold", wrap=True)
    if note:
        fig.text(0.5, 1 - (top - 0.04) / height, note, ha="center", va="bottom", fontsize=7,
                 color="0.35")
    return _save(fig, path, dpi=GRID_DPI, palette=True)
