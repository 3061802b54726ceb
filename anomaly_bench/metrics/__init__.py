"""Evaluation metrics in pure torch: ROC/AUROC/F1-max, official MVTec AD PRO/AUPRO."""

from anomaly_bench.metrics.evaluate import METRIC_NAMES, compute_metrics
from anomaly_bench.metrics.pro import aupro, label_regions, pro_curve
from anomaly_bench.metrics.roc import auroc, f1_max, roc_curve

__all__ = [
    "METRIC_NAMES",
    "aupro",
    "auroc",
    "compute_metrics",
    "f1_max",
    "label_regions",
    "pro_curve",
    "roc_curve",
]
