"""Per-category figures: ROC curve, score histogram, score scatter, anomaly-map overlays.

Matplotlib with the Agg backend; every function writes one PNG (150 dpi) and closes its
figure.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from anomaly_bench.fsutil import atomic_open

NORMAL_COLOR, ANOMALY_COLOR = "#1f77b4", "#d62728"


def _save(fig: plt.Figure, path: Path) -> Path:
    try:
        with atomic_open(path, "wb", durable=False) as fh:
            fig.savefig(fh, format="png", dpi=150, bbox_inches="tight")
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
           ylabel="True positive rate", title=f"ROC · {title}")
    ax.legend(loc="lower right", frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _bins(scores: np.ndarray, n: int = 30) -> np.ndarray:
    lo, hi = float(np.min(scores)), float(np.max(scores))
    return np.linspace(lo, hi if hi > lo else lo + 1.0, n + 1)


def plot_score_histogram(path: Path, scores: np.ndarray, labels: np.ndarray, title: str) -> Path:
    """Overlaid histograms of normal and anomalous image scores on shared bins."""
    bins = _bins(scores)
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for lab, name, color in ((0, "normal", NORMAL_COLOR), (1, "anomalous", ANOMALY_COLOR)):
        sel = scores[labels == lab]
        if sel.size:
            ax.hist(sel, bins=bins, alpha=0.55, color=color, label=f"{name} (n={sel.size})")
    ax.set(xlabel="Image anomaly score", ylabel="Images", title=f"Scores · {title}")
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
    ax.set(xlabel="Test image", ylabel="Image anomaly score", title=f"Scores · {title}")
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    side.set_xlabel("Count")
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


def plot_overlay_grid(path: Path, images: np.ndarray, maps: np.ndarray, masks: np.ndarray | None,
                      titles: list[str], vmin: float, vmax: float, max_items: int = 16) -> Path:
    """Rows of (image, heat-map overlay) pairs with one colour scale and GT contours."""
    n = min(len(images), max_items)
    cols = 4  # two (image, overlay) pairs per row
    rows = int(np.ceil(n / 2))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.1, rows * 2.25), squeeze=False)
    im = None
    for k in range(rows * 2):
        a_img, a_map = axes[k // 2, 2 * (k % 2)], axes[k // 2, 2 * (k % 2) + 1]
        for a in (a_img, a_map):
            a.axis("off")
        if k >= n:
            continue
        a_img.imshow(images[k])
        a_img.set_title(titles[k], fontsize=7)
        a_map.imshow(images[k])
        im = a_map.imshow(maps[k], cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
        if masks is not None and masks[k].any():
            a_map.contour(masks[k].astype(float), levels=[0.5], colors="white", linewidths=0.8)
        a_map.set_title("anomaly map", fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="anomaly score")
    return _save(fig, path)
