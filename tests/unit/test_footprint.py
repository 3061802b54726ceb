"""The memory check: the estimate of a configuration against the machine's memory."""

from __future__ import annotations

import pytest
import torch

from anomaly_bench.errors import ConfigError
from anomaly_bench.footprint import check, estimate, feature_shapes, machine_memory

WHY = {"inputs": "(batch_size)", "features": "(layers)", "method": "(method)", "maps": "(maps)"}


def test_parts_of_the_estimate():
    shapes = feature_shapes({"layer1": 64, "layer2": 128}, {"layer1": 4, "layer2": 8},
                            (256, 128))
    assert shapes == {"layer1": (64, 64, 32), "layer2": (128, 32, 16)}
    fp = estimate(shapes, (256, 128), batch_size=2, method_bytes=1000, n_test=3, masks=True)
    assert fp.inputs == 2 * 3 * 256 * 128 * 4
    assert fp.features == 2 * (64 * 64 * 32 + 128 * 32 * 16) * 4
    assert fp.maps == 3 * 256 * 128 * 5 and fp.method == 1000
    assert fp.total == fp.inputs + fp.features + fp.method + fp.maps


def test_a_footprint_beyond_the_machine_is_refused_naming_its_parts():
    cpu = torch.device("cpu")
    available, _ = machine_memory(cpu)
    assert available is not None and available > 0
    small = estimate({"a": (8, 4, 4)}, (16, 16), 1, 0, 1, False)
    check(small, cpu, WHY)  # fits
    shapes = feature_shapes({"a": 64}, {"a": 4}, (20000, 20000))
    huge = estimate(shapes, (20000, 20000), 256, 0, 10, True)
    with pytest.raises(ConfigError) as err:
        check(huge, cpu, WHY)
    text = str(err.value)
    assert "(batch_size)" in text and "(layers)" in text and "(maps)" in text
    assert "(method)" not in text  # a part of 0 bytes is not listed
