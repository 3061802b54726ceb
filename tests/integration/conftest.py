"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from anomaly_bench.data import ensure_synthetic

    return ensure_synthetic(tmp_path_factory.mktemp("data") / "synthetic", seed=0)
