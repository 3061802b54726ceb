"""Shared fixtures. Dataset writers live in ``tests/fixtures.py`` (imported by name because
pytest puts this folder on ``sys.path``; a plain ``conftest`` import would be ambiguous)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures import WRITERS


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """``make_dataset(layout, subdir=None, **kw)``: write a tiny dataset, return its root.

    ``layout`` is one of mvtec, btad, mpdd, folder; the root is ``tmp_path/<subdir or layout>``.
    """

    def make(layout: str, subdir: str | None = None, **kw) -> Path:
        return WRITERS[layout](tmp_path / (subdir or layout), **kw)

    return make
