"""All benchmark metrics of one category from the stacked test outputs."""

from __future__ import annotations

import torch

from anomaly_bench.metrics.pro import pixel_metrics
from anomaly_bench.metrics.roc import auroc, binary_labels, f1_max

__all__ = ["METRIC_NAMES", "compute_metrics"]

METRIC_NAMES = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")


def _squeeze_channel(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) -> (N, H, W); other shapes unchanged."""
    return x[:, 0] if x.dim() == 4 and x.shape[1] == 1 else x


def compute_metrics(
    image_scores: torch.Tensor,
    image_labels: torch.Tensor,
    anomaly_maps: torch.Tensor | None,
    masks: torch.Tensor | None,
) -> dict[str, float | None]:
    """Image AUROC and F1-max, pixel AUROC and AUPRO (official MVTec AD definition).

    A metric the data cannot define is None, never 0 and never an exception: image
    metrics when the labels hold one class only, pixel metrics when there are no maps or
    masks, or when the masks hold no defect pixel (or no defect-free pixel).
    """
    scores = torch.as_tensor(image_scores).reshape(-1)
    labels = binary_labels(image_labels).reshape(-1).to(scores.device)
    n_pos = int(labels.sum())
    both_classes = 0 < n_pos < labels.numel()
    out: dict[str, float | None] = dict.fromkeys(METRIC_NAMES)
    if both_classes:
        out["image_auroc"] = auroc(scores, labels)
        out["image_f1_max"] = f1_max(scores, labels)
    if anomaly_maps is not None and masks is not None:
        maps = _squeeze_channel(torch.as_tensor(anomaly_maps))
        m = binary_labels(_squeeze_channel(torch.as_tensor(masks))).to(maps.device)
        if maps.shape != m.shape:
            raise ValueError(f"anomaly_maps {tuple(maps.shape)} and masks {tuple(m.shape)} "
                             "differ in shape")
        out["pixel_auroc"], out["aupro"] = pixel_metrics(maps, m)
    return out
