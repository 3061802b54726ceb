"""compute_metrics: values against scikit-learn and the PRO reference, None when undefined."""

import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from anomaly_bench.metrics import METRIC_NAMES, compute_metrics

from test_metrics_pro import _random_case, _reference_aupro  # the shared slow references


def _case(seed: int = 0):
    maps, masks = _random_case(seed)
    labels = masks.reshape(len(masks), -1).any(1)
    scores = maps.reshape(len(maps), -1).max(1)
    return scores, labels, maps, masks


def test_values_match_references():
    scores, labels, maps, masks = _case()
    out = compute_metrics(torch.from_numpy(scores), torch.from_numpy(labels),
                          torch.from_numpy(maps), torch.from_numpy(masks))
    assert tuple(out) == METRIC_NAMES
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in out.values())
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()),
                                               abs=1e-6)
    assert out["aupro"] == pytest.approx(_reference_aupro(maps, masks), abs=1e-6)


def test_undefined_metrics_are_none():
    scores, labels, maps, masks = _case()
    s, y, m = torch.from_numpy(scores), torch.from_numpy(labels), torch.from_numpy(maps)
    out = compute_metrics(s, y, m, None)
    assert out["pixel_auroc"] is None and out["aupro"] is None
    assert out["image_auroc"] is not None
    assert compute_metrics(s, y, None, torch.from_numpy(masks))["aupro"] is None
    one_class = compute_metrics(s, torch.zeros_like(y), m, torch.zeros(m.shape))
    assert all(v is None for v in one_class.values())
    all_anomalous = compute_metrics(s, torch.ones(len(s)), None, None)
    assert all_anomalous["image_auroc"] is None and all_anomalous["image_f1_max"] is None
    empty = compute_metrics(torch.empty(0), torch.empty(0), torch.empty(0, 8, 8),
                            torch.empty(0, 8, 8))
    assert all(v is None for v in empty.values())


def test_dtype_channel_dim_and_order_invariance():
    scores, labels, maps, masks = _case(1)
    s, y = torch.from_numpy(scores).float(), torch.from_numpy(labels)
    m, k = torch.from_numpy(maps).float(), torch.from_numpy(masks)
    base = compute_metrics(s, y, m, k)
    perm = torch.randperm(len(s), generator=torch.Generator().manual_seed(0))
    variants = [
        compute_metrics(s.double(), y.long(), m.double(), k.float()),
        compute_metrics(s, y.float(), m[:, None], k.float()[:, None]),
        compute_metrics(s[perm], y[perm], m[perm], k[perm]),
    ]
    for other in variants:
        for name in METRIC_NAMES:
            assert other[name] == pytest.approx(base[name], abs=1e-9), name


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        compute_metrics(torch.rand(2), torch.tensor([0, 1]), torch.rand(2, 8, 8),
                        torch.zeros(2, 8, 9))


def test_pixel_ap_and_f1_max_match_sklearn_over_every_pixel_of_the_category():
    from test_metrics_roc import _sk_f1_max

    scores, labels, maps, masks = _case(1)
    out = compute_metrics(torch.from_numpy(scores), torch.from_numpy(labels),
                          torch.from_numpy(maps), torch.from_numpy(masks))
    pix_s, pix_y = maps.reshape(-1), masks.reshape(-1).astype(bool)
    assert out["pixel_ap"] == pytest.approx(average_precision_score(pix_y, pix_s), abs=1e-6)
    assert out["pixel_f1_max"] == pytest.approx(_sk_f1_max(pix_s, pix_y), abs=1e-6)
    assert out["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
