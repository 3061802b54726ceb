"""The CUDA switches, checked on any machine: the backbone's autocast precision, loader
workers and pinning, timing without per-batch synchronisation, memory release."""

from __future__ import annotations

import pytest
import torch

from anomaly_bench.errors import ConfigError
from anomaly_bench.methods.common import build_extractor
from anomaly_bench.runtime import Stopwatch, loader_workers, release
from anomaly_bench.schema import validate

BACKBONE = {"name": "resnet18", "kind": "cnn", "hub_tag": "tv_in1k", "pretrained": False,
            "weights": None, "truncate": True, "cache": {"enabled": False}}
LAYERS = {"layer1": -1, "layer2": -1, "layer3": None, "layer4": None}


def test_bf16_autocast_runs_the_backbone_and_hands_float32_features_on():
    """bf16 autocast on the CPU: the same blocks, float32 out, within bf16's rounding
    (8 mantissa bits: relative steps of 2^-8 per operation) of the float32 pass."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    plain = build_extractor({**BACKBONE, "precision": "fp32"}, LAYERS, seed=0)
    half = build_extractor({**BACKBONE, "precision": "bf16"}, LAYERS, seed=0)
    assert plain.autocast_dtype is None and half.autocast_dtype is torch.bfloat16
    assert half.backbone_id == plain.backbone_id + "|bf16"  # never shares cache entries
    a, b = plain(images), half(images)
    assert set(a) == set(b) == {"layer1", "layer2"}
    for name in a:
        x, y = a[name], b[name]
        assert y.dtype == torch.float32 and y.shape == x.shape
        rel = (y - x).norm() / x.norm()
        assert 0 < rel < 0.05, (name, float(rel))


def test_precision_is_checked():
    from anomaly_bench.methods import method_schema

    with pytest.raises(ConfigError, match=r"backbone\.precision"):
        validate({"backbone": {**BACKBONE, "precision": "fp64"}}, method_schema("padim"))


def test_loader_workers_auto_is_none_on_cpu_and_some_on_cuda(monkeypatch):
    assert loader_workers("auto", torch.device("cpu")) == 0
    assert loader_workers(3, torch.device("cpu")) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(32)))
    assert loader_workers("auto", torch.device("cuda", 0)) == 8
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    assert loader_workers("auto", torch.device("cuda", 1)) == 2


def test_stopwatch_on_cpu_sums_its_blocks():
    watch = Stopwatch(torch.device("cpu"))
    for _ in range(3):
        with watch:
            torch.ones(10).sum()
    assert watch.seconds > 0
    release(torch.device("cpu"))  # nothing to give back on the CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stopwatch_and_pinned_batches():
    from anomaly_bench.types import Batch

    dev = torch.device("cuda", 0)
    watch = Stopwatch(dev)
    x = torch.randn(1024, 1024, device=dev)
    for _ in range(3):
        with watch:
            x = x @ x.t() / 1024
    assert watch.seconds > 0
    batch = Batch(images=torch.zeros(2, 3, 8, 8), labels=torch.zeros(2, dtype=torch.long),
                  paths=["a", "b"], defect_types=["good", "good"])
    pinned = batch.pin_memory()
    assert pinned.images.is_pinned() and pinned.to(dev).images.device == dev
    release(dev)
