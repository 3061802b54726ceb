"""Evaluation metrics in pure torch: ROC/AUROC/F1-max/AP, official MVTec AD PRO/AUPRO, and
the 200-threshold PROs of the APRIL-GAN and MMR repositories."""

from anomaly_bench.metrics.evaluate import METRIC_NAMES, compute_metrics, pixel_metrics
from anomaly_bench.metrics.pro import aupro, label_regions, pro_curve
from anomaly_bench.metrics.pro200 import aupro_200, aupro_200_per_image
from anomaly_bench.metrics.roc import auroc, average_precision, f1_max, roc_curve

__all__ = [
    "METRIC_NAMES",
    "aupro",
    "aupro_200",
    "aupro_200_per_image",
    "auroc",
    "average_precision",
    "compute_metrics",
    "f1_max",
    "label_regions",
    "pixel_metrics",
    "pro_curve",
    "roc_curve",
]
