"""VisA as published: images and masks under Data/, train/test by split_csv/1cls.csv."""

from __future__ import annotations

import pytest

from anomaly_bench.data import get_layout, resolve_categories, resolve_root
from anomaly_bench.errors import DataError


def test_split_follows_the_official_split_file(make_dataset):
    root = make_dataset("visa")
    layout = get_layout("visa")
    assert resolve_root("visa", None, root.parent, ["visa"]) == root
    assert resolve_categories(layout, root, "all") == ["candle", "pcb1"]
    split = layout.split(root, "pcb1")
    assert [r.image_path.name for r in split.train] == ["0000.JPG", "0001.JPG", "0002.JPG"]
    assert sorted((r.label, r.image_path.name) for r in split.test) == [
        (0, "0003.JPG"), (0, "0004.JPG"), (1, "000.JPG"), (1, "001.JPG")]
    for r in split.test:
        if r.label == 1:
            assert r.mask_path == root / "pcb1" / "Data" / "Masks" / "Anomaly" / r.mask_path.name
            assert r.mask_path.stem == r.image_path.stem
    assert split.has_masks and all(r.image_path.parts[-5] == "pcb1" for r in split.train)


def test_missing_split_file_image_or_mask_is_named(make_dataset):
    root = make_dataset("visa")
    (root / "pcb1" / "Data" / "Masks" / "Anomaly" / "001.png").unlink()
    with pytest.raises(DataError, match="Missing mask"):
        get_layout("visa").split(root, "pcb1")
    (root / "candle" / "Data" / "Images" / "Normal" / "0000.JPG").unlink()
    with pytest.raises(DataError, match="does not exist"):
        get_layout("visa").split(root, "candle")
    (root / "split_csv" / "1cls.csv").unlink()
    assert get_layout("visa").categories(root) == []
