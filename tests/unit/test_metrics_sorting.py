"""The CPU sorts against torch.sort: same order of scores, same payloads."""

import numpy as np
import pytest
import torch

from anomaly_bench.metrics.sorting import _packable, select, sort_asc, sort_desc


def _pairs(scores: torch.Tensor, payload: torch.Tensor) -> list[tuple[float, int]]:
    return sorted(zip(scores.tolist(), payload.long().tolist(), strict=True),
                  key=lambda p: (-p[0], p[1]))


@pytest.mark.parametrize("payload_kind", ["bool", "ids", "int32"])
def test_packed_sort_equals_torch_sort(payload_kind):
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=5000), 1).astype(np.float32)  # many ties, both signs
    scores[:4] = [0.0, -0.0, np.inf, -np.inf]
    scores[4:8] = np.float32(1e-45), -np.float32(1e-45), np.finfo(np.float32).max, -3.5
    s = torch.from_numpy(scores)
    payload = {"bool": torch.from_numpy(rng.random(5000) < 0.3),
               "ids": torch.from_numpy(rng.integers(0, 2**32 - 1, 5000)),
               "int32": torch.from_numpy(rng.integers(0, 9, 5000).astype(np.int32))
               }[payload_kind]
    got_s, got_p = sort_desc(s, payload)
    assert _packable(s, payload)
    want_s, order = torch.sort(s, descending=True)
    assert torch.equal(got_s, want_s)  # -0.0 comes back as +0.0, which compares equal
    assert got_p.dtype == (torch.bool if payload_kind == "bool" else torch.int64)
    # within a run of equal scores the payload order may differ; the multiset may not
    assert _pairs(got_s, got_p) == _pairs(want_s, payload[order])


def test_unpackable_inputs_use_torch_sort():
    s = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    got_s, got_p = sort_desc(s, torch.tensor([7, 8, 9]))
    assert got_s.tolist() == [2.0, 1.0, 0.5] and got_p.tolist() == [8, 9, 7]
    big = torch.tensor([2**40, 1, 2])  # payload wider than 32 bits
    assert not _packable(s.float(), big) and not _packable(s, big.clamp(max=3))
    got_s, got_p = sort_desc(s.float(), big)
    assert got_p.tolist() == [1, 2, 2**40]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_ascending_sort_equals_torch_sort(dtype):
    """NumPy's sort for float32 and float64, torch.sort for the others: the same values."""
    rng = np.random.default_rng(1)
    values = torch.from_numpy(np.round(rng.normal(size=4000), 2)).to(dtype)  # ties
    values[:4] = torch.tensor([0.0, -0.0, float("inf"), -float("inf")], dtype=dtype)
    got = sort_asc(values)
    assert got.dtype == dtype and torch.equal(got, torch.sort(values).values)
    assert sort_asc(values[:0]).numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64, torch.bfloat16])
def test_select_equals_boolean_indexing(dtype):
    rng = np.random.default_rng(2)
    values = torch.from_numpy(rng.integers(-50, 50, 3000)).to(dtype)
    mask = torch.from_numpy(rng.random(3000) < 0.2)
    got = select(values, mask)
    assert got.dtype == dtype and torch.equal(got, values[mask])
    assert torch.equal(select(values[::2], mask[::2]), values[::2][mask[::2]])  # strided
