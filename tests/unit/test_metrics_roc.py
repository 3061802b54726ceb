"""ROC curve, AUROC and F1-max against scikit-learn (with many ties) and by hand."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from anomaly_bench.metrics import auroc, f1_max, roc_curve
from anomaly_bench.metrics.roc import average_precision


def _tied_data(seed: int, n: int = 2000, decimals: int = 1):
    """Scores rounded to ``decimals`` (so most values tie) and labels mildly correlated."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = np.round(rng.random(n) + 0.3 * labels, decimals)
    return scores, labels


def _sk_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(labels, scores)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    return float(f1.max())


@pytest.mark.parametrize("seed,decimals", [(0, 1), (1, 1), (2, 2), (3, 6)])
def test_matches_sklearn_with_ties(seed, decimals):
    scores, labels = _tied_data(seed, decimals=decimals)
    s, y = torch.from_numpy(scores), torch.from_numpy(labels)
    fpr, tpr, thr = roc_curve(s, y)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(labels, scores, drop_intermediate=False)
    assert fpr.shape == sk_fpr.shape
    np.testing.assert_allclose(fpr.numpy(), sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr.numpy(), sk_tpr, atol=1e-12)
    np.testing.assert_array_equal(thr.numpy(), sk_thr)
    assert auroc(s, y) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert f1_max(s, y) == pytest.approx(_sk_f1_max(scores, labels), abs=1e-6)


def test_float_labels_and_float32_scores():
    scores, labels = _tied_data(4)
    s32 = torch.from_numpy(scores).float()
    y = torch.from_numpy(labels.astype(np.float32))
    assert auroc(s32, y) == pytest.approx(roc_auc_score(labels, s32.numpy()), abs=1e-6)
    assert auroc(s32, y) == pytest.approx(auroc(s32.double(), y.bool()), abs=1e-12)
    assert f1_max(s32, y) == pytest.approx(_sk_f1_max(s32.numpy(), labels), abs=1e-6)


def test_hand_computed():
    # sklearn's docstring example: pairs (pos, neg) ordered right in 3 of 4 -> 0.75.
    s, y = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])
    assert auroc(s, y) == pytest.approx(0.75)
    # Thresholds 0.8, 0.4, 0.35, 0.1 give F1 = 2TP/(TP+FP+P) = 2/3, 1/2, 4/5, 2/3.
    assert f1_max(s, y) == pytest.approx(0.8)
    fpr, tpr, thr = roc_curve(s, y)
    np.testing.assert_allclose(fpr.numpy(), [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr.numpy(), [0, 0.5, 0.5, 1, 1])
    assert thr[0] == float("inf")
    # A tie between a positive and a negative counts one half.
    assert auroc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == pytest.approx(0.5)
    assert auroc(torch.tensor([1.0, 0.5, 0.5]), torch.tensor([1, 0, 1])) == pytest.approx(0.75)


def test_undefined_cases_are_none():
    s = torch.rand(10)
    assert auroc(s, torch.zeros(10)) is None
    assert auroc(s, torch.ones(10, dtype=torch.bool)) is None
    assert auroc(torch.empty(0), torch.empty(0)) is None
    assert f1_max(s, torch.zeros(10)) is None
    assert f1_max(torch.empty(0), torch.empty(0)) is None
    assert f1_max(s, torch.ones(10)) == pytest.approx(1.0)  # defined: predict all positive
    nan = s.clone()
    nan[3] = float("nan")
    y = torch.arange(10) % 2
    assert auroc(nan, y) is None
    assert f1_max(nan, y) is None
    with pytest.raises(ValueError):
        roc_curve(nan, y)
    with pytest.raises(ValueError):
        auroc(s, torch.zeros(9))


def test_perfect_and_inverted_scores():
    y = torch.tensor([0, 0, 1, 1, 1])
    s = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    assert auroc(s, y) == 1.0
    assert auroc(-s, y) == 0.0
    assert f1_max(s, y) == 1.0
    assert isinstance(auroc(s, y), float)


def _slow_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP by its definition: for each distinct score, highest first, (R_n - R_{n-1}) P_n."""
    total, prev_recall, n_pos = 0.0, 0.0, labels.sum()
    for t in sorted(set(scores.tolist()), reverse=True):
        hit = scores >= t
        tp = (hit & labels).sum()
        recall = tp / n_pos
        total += (recall - prev_recall) * tp / hit.sum()
        prev_recall = recall
    return float(total)


@pytest.mark.parametrize("seed,decimals", [(0, 1), (1, 2), (2, 6)])
def test_average_precision_matches_sklearn_and_its_definition(seed, decimals):
    scores, labels = _tied_data(seed, n=600, decimals=decimals)
    got = average_precision(torch.from_numpy(scores), torch.from_numpy(labels))
    assert got == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert got == pytest.approx(_slow_ap(scores, labels), abs=1e-9)


def test_average_precision_undefined_without_positives_or_with_nan():
    assert average_precision(torch.rand(5), torch.zeros(5)) is None
    assert average_precision(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1])) is None
