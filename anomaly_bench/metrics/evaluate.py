"""All benchmark metrics of one category from the stacked test outputs."""

from __future__ import annotations

import torch

from anomaly_bench.metrics.pro import aupro_of, counts_of, regions_of
from anomaly_bench.metrics.pro200 import aupro_200_of, per_image_of
from anomaly_bench.metrics.roc import (
    _has_nan,
    ap_from_counts,
    area_from_counts,
    auroc,
    average_precision,
    binary_labels,
    f1_from_counts,
    f1_max,
)

__all__ = ["IMAGE_METRICS", "METRIC_NAMES", "PIXEL_METRICS", "compute_metrics",
           "pixel_metrics"]

#: Every metric of a results.csv row, in column order.
METRIC_NAMES = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "image_ap", "pixel_ap",
                "pixel_f1_max", "aupro_200", "aupro_200_per_image")
IMAGE_METRICS = ("image_auroc", "image_f1_max", "image_ap")
PIXEL_METRICS = tuple(m for m in METRIC_NAMES if m not in IMAGE_METRICS)


def _squeeze_channel(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) -> (N, H, W); other shapes unchanged."""
    return x[:, 0] if x.dim() == 4 and x.shape[1] == 1 else x


def pixel_metrics(anomaly_maps: torch.Tensor, masks: torch.Tensor,
                  fpr_limit: float = 0.3) -> dict[str, float | None]:
    """Every pixel metric (:data:`PIXEL_METRICS`) from one labelling of the masks and one
    sort of all pixels: pixel AUROC, official AUPRO up to ``fpr_limit``, pixel AP and
    F1-max read off the same cumulative counts; APRIL-GAN's ``aupro_200`` off them too and
    MMR's ``aupro_200_per_image`` from one bucketize (:mod:`~anomaly_bench.metrics.pro200`).

    All None when the maps are empty or contain NaN, or the masks hold one class only (no
    defect pixel, or no defect-free pixel); the two repository PROs also where their own
    definitions are undefined.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    out: dict[str, float | None] = dict.fromkeys(PIXEL_METRICS)
    regions = regions_of(anomaly_maps, masks)
    if regions.maps.numel() == 0 or _has_nan(regions.maps):
        return out
    counts = counts_of(regions)
    if counts.n_regions == 0 or counts.n_normal == 0:
        return out
    out.update(
        pixel_auroc=area_from_counts(counts.fp, counts.tp),
        aupro=aupro_of(counts, fpr_limit),
        pixel_ap=ap_from_counts(counts.fp, counts.tp),
        pixel_f1_max=f1_from_counts(counts.fp, counts.tp),
        aupro_200=aupro_200_of(counts),
        aupro_200_per_image=per_image_of(regions),
    )
    return out


def compute_metrics(
    image_scores: torch.Tensor,
    image_labels: torch.Tensor,
    anomaly_maps: torch.Tensor | None,
    masks: torch.Tensor | None,
) -> dict[str, float | None]:
    """Every metric of :data:`METRIC_NAMES`: image AUROC, F1-max and AP from the image
    scores; the pixel metrics of :func:`pixel_metrics` from the maps and masks.

    A metric the data cannot define is None, never 0 and never an exception: image
    metrics when the labels hold one class only, pixel metrics when there are no maps or
    masks, or when the masks hold no defect pixel (or no defect-free pixel), and the
    repository PROs where their definitions fail (a constant map, no kept FPR above 0).
    """
    scores = torch.as_tensor(image_scores).reshape(-1)
    labels = binary_labels(image_labels).reshape(-1).to(scores.device)
    n_pos = int(labels.sum())
    both_classes = 0 < n_pos < labels.numel()
    out: dict[str, float | None] = dict.fromkeys(METRIC_NAMES)
    if both_classes:
        out["image_auroc"] = auroc(scores, labels)
        out["image_f1_max"] = f1_max(scores, labels)
        out["image_ap"] = average_precision(scores, labels)
    if anomaly_maps is not None and masks is not None:
        maps = _squeeze_channel(torch.as_tensor(anomaly_maps))
        m = _squeeze_channel(torch.as_tensor(masks))
        if maps.shape != m.shape:
            raise ValueError(f"anomaly_maps {tuple(maps.shape)} and masks {tuple(m.shape)} "
                             "differ in shape")
        out.update(pixel_metrics(maps, m))
    return out
