"""AeBAD-S as published: one category, training sub-folders, four domain-shift subsets."""

from __future__ import annotations

import pytest

from anomaly_bench.data import get_layout, resolve_categories, resolve_root
from anomaly_bench.errors import DataError


def test_split_reads_sub_folders_domains_and_same_name_masks(make_dataset):
    root = make_dataset("aebad_s")
    layout = get_layout("aebad_s")
    assert resolve_root("aebad_s", None, root, ["AeBAD", "."]) == root
    assert resolve_categories(layout, root, "all") == ["AeBAD_S"]
    split = layout.split(root, "AeBAD_S")
    assert len(split.train) == 6 and {r.image_path.parent.name for r in split.train} == {
        "sub1", "sub2"}
    assert split.subsets == ("same", "background", "illumination", "view")
    assert len(split.test) == 16 and split.has_masks
    for r in split.test:
        assert r.subset == r.image_path.parent.name
        if r.label == 1:
            assert r.defect_type == "breakdown"
            assert r.mask_path == (root / "AeBAD_S" / "ground_truth" / "breakdown" / r.subset
                                   / r.image_path.name)
        else:
            assert r.mask_path is None and r.defect_type == "good"


def test_only_domains_present_are_subsets(make_dataset):
    root = make_dataset("aebad_s", domains=("same", "view"))
    assert get_layout("aebad_s").split(root, "AeBAD_S").subsets == ("same", "view")


def test_unknown_domain_folder_and_missing_mask_are_named(make_dataset):
    root = make_dataset("aebad_s")
    (root / "AeBAD_S" / "test" / "good" / "weather").mkdir()
    with pytest.raises(DataError, match=r"weather.*same, background, illumination, view"):
        get_layout("aebad_s").split(root, "AeBAD_S")
    (root / "AeBAD_S" / "test" / "good" / "weather").rmdir()
    (root / "AeBAD_S" / "ground_truth" / "breakdown" / "view" / "001.png").unlink()
    with pytest.raises(DataError, match=r"Missing mask.*view/001\.png"):
        get_layout("aebad_s").split(root, "AeBAD_S")
