"""ROC curve, AUROC, F1-max and average precision in pure torch, matching scikit-learn.

All of them share one descending sort of the scores followed by a cumulative count of
positives, so they run in O(N log N) on whatever device the scores live on (pixel AUROC
pools millions of pixels). Ties are collapsed to one point per distinct score, keeping
the last position of each run of equal scores, exactly as ``sklearn.metrics`` does.
Counts are accumulated as float64, which is exact up to 2**53 samples.
"""

from __future__ import annotations

import logging

import torch

from anomaly_bench.metrics.sorting import sort_desc

log = logging.getLogger("anomaly_bench")

__all__ = ["ap_from_counts", "area_from_counts", "auroc", "average_precision", "binary_labels",
           "f1_from_counts", "f1_max", "roc_curve"]


def binary_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels or masks as a bool tensor: bool kept, numbers ``> 0.5`` are positive."""
    labels = torch.as_tensor(labels)
    return labels if labels.dtype == torch.bool else labels > 0.5


def _flatten(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat scores (floating point, as given) and bool labels on the scores' device."""
    scores = torch.as_tensor(scores)
    labels = binary_labels(labels).to(scores.device)
    if scores.numel() != labels.numel():
        raise ValueError(f"scores ({tuple(scores.shape)}) and labels ({tuple(labels.shape)}) "
                         "hold different numbers of elements")
    scores = scores.reshape(-1)
    if not scores.is_floating_point():
        scores = scores.double()
    return scores, labels.reshape(-1)


def _tie_counts(
    scores: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cumulative false and true positives at each distinct score, highest score first.

    Returns ``fps``, ``tps`` (float64) and the matching thresholds; point ``i`` counts every
    sample whose score is ``>= thresholds[i]`` as positive (sklearn's ``_binary_clf_curve``).
    """
    sorted_scores, sorted_labels = sort_desc(scores, labels)
    tps_all = torch.cumsum(sorted_labels, 0, dtype=torch.float64)
    last = torch.ones_like(sorted_scores, dtype=torch.bool)
    last[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    idx = last.nonzero().squeeze(1)
    tps = tps_all[idx]
    fps = (idx + 1).to(torch.float64) - tps
    return fps, tps, sorted_scores[idx]


def _has_nan(scores: torch.Tensor) -> bool:
    """True (with a warning) when ``scores`` contain NaN, which has no rank."""
    # the sum is NaN whenever a score is (and when +inf and -inf meet): one reduction
    # and one host sync instead of a boolean map of every score
    if scores.is_floating_point() and scores.numel() and bool(torch.isnan(scores.sum())) \
            and bool(torch.isnan(scores).any()):
        log.warning("scores contain NaN; the metric is undefined and reported as None")
        return True
    return False


def roc_curve(
    scores: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ROC curve like ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)``.

    One point per distinct score (ties collapsed) plus the (0, 0) start whose threshold is
    ``inf``. ``fpr``/``tpr`` are float64; they hold NaN when a class is absent, as sklearn's.
    """
    s, y = _flatten(scores, labels)
    if torch.isnan(s).any():
        raise ValueError("roc_curve: scores contain NaN")
    fps, tps, thresholds = _tie_counts(s, y)
    zero = fps.new_zeros(1)
    fps, tps = torch.cat([zero, fps]), torch.cat([zero, tps])
    thresholds = torch.cat([thresholds.new_full((1,), float("inf")), thresholds])
    return fps / fps[-1], tps / tps[-1], thresholds


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Area under the ROC curve (trapezoids over tie-collapsed points), as ``roc_auc_score``.

    None when the labels hold one class only (or nothing) or the scores contain NaN.
    The area is summed in integer count units and divided once, so it is exact to float64.
    """
    s, y = _flatten(scores, labels)
    if s.numel() == 0 or _has_nan(s):
        return None
    fps, tps, _ = _tie_counts(s, y)
    return area_from_counts(fps, tps)


def area_from_counts(fps: torch.Tensor, tps: torch.Tensor) -> float | None:
    """AUROC from cumulative false/true positive counts at each distinct score (highest
    first, as :func:`_tie_counts` gives them); None when a class is absent."""
    n_neg, n_pos = float(fps[-1]), float(tps[-1])
    if n_neg == 0 or n_pos == 0:
        return None
    d_fps = torch.diff(fps, prepend=fps.new_zeros(1))
    tps_prev = torch.cat([tps.new_zeros(1), tps[:-1]])
    twice_area = float((d_fps * (tps + tps_prev)).sum())
    return min(max(twice_area / (2.0 * n_neg * n_pos), 0.0), 1.0)


def f1_max(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Best F1 over all thresholds of the precision-recall curve (sklearn's points).

    At each distinct score F1 = 2 TP / (TP + FP + P). None when there is no positive or the
    scores contain NaN.
    """
    s, y = _flatten(scores, labels)
    if s.numel() == 0 or _has_nan(s):
        return None
    return f1_from_counts(*_tie_counts(s, y)[:2])


def f1_from_counts(fps: torch.Tensor, tps: torch.Tensor) -> float | None:
    """F1-max from cumulative counts at each distinct score (as :func:`area_from_counts`
    takes them); None when there is no positive."""
    n_pos = tps[-1]
    if float(n_pos) == 0:
        return None
    f1 = 2.0 * tps / (tps + fps + n_pos)
    return min(max(float(f1.max()), 0.0), 1.0)


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Average precision as ``sklearn.metrics.average_precision_score``: the sum over
    distinct scores (ties form one threshold) of (R_n - R_{n-1}) P_n, no interpolation.

    None when there is no positive or the scores contain NaN.
    """
    s, y = _flatten(scores, labels)
    if s.numel() == 0 or _has_nan(s):
        return None
    return ap_from_counts(*_tie_counts(s, y)[:2])


def ap_from_counts(fps: torch.Tensor, tps: torch.Tensor) -> float | None:
    """Average precision from cumulative counts at each distinct score (highest first);
    None when there is no positive.

    The recall step of each threshold is its count of new positives over P; every
    threshold admits at least one sample, so TP + FP > 0 wherever precision is read.
    """
    n_pos = float(tps[-1])
    if n_pos == 0:
        return None
    new_tps = torch.diff(tps, prepend=tps.new_zeros(1))
    precision = tps / (tps + fps)
    return min(max(float((new_tps * precision).sum()) / n_pos, 0.0), 1.0)
