"""Dataset layouts read from tiny fixtures: records, labels, mask pairing and error messages."""

import shutil
from pathlib import Path

import pytest

from anomaly_bench.data import (
    LAYOUTS,
    available_layouts,
    get_layout,
    register_layout,
    resolve_categories,
    resolve_root,
)
from anomaly_bench.data.mvtec import MVTecLikeLayout
from anomaly_bench.errors import ConfigError, DataError


def test_known_layouts_and_unknown_name():
    assert {"mvtec", "folder", "btad", "mpdd", "synthetic"} <= set(available_layouts())
    with pytest.raises(ConfigError) as err:
        get_layout("mvtek")
    assert "mvtek" in str(err.value) and "btad, folder" in str(err.value)


def test_register_a_new_layout_with_one_call():
    layout = MVTecLikeLayout(name="toy_layout", title="Toy")
    try:
        assert register_layout(layout) is layout
        assert get_layout("toy_layout") is layout
    finally:
        LAYOUTS.pop("toy_layout", None)


def test_mvtec_split(make_dataset):
    root = make_dataset("mvtec")
    layout = get_layout("mvtec")
    assert layout.categories(root) == ["bottle", "cable"]
    split = layout.split(root, "cable")
    assert (split.dataset, split.category, split.root, split.has_masks) == (
        "mvtec", "cable", root, True)
    assert len(split.train) == 3 and all(r.label == 0 for r in split.train)
    assert [p.image_path.name for p in split.train] == ["000.png", "001.png", "002.png"]
    good = [r for r in split.test if r.label == 0]
    bad = [r for r in split.test if r.label == 1]
    assert len(good) == 2 and all(r.mask_path is None and r.defect_type == "good" for r in good)
    assert len(bad) == 4 and {r.defect_type for r in bad} == {"crack", "hole"}
    for r in bad:
        assert r.mask_path == root / "cable" / "ground_truth" / r.defect_type / (
            r.image_path.stem + "_mask.png")


def test_image_listing_is_sorted_and_case_insensitive(make_dataset):
    root = make_dataset("mvtec", categories=("bottle",))
    train = root / "bottle" / "train" / "good"
    shutil.copy(train / "000.png", train / "010.PNG")
    (train / "notes.txt").write_text("not an image")
    (train / ".hidden.png").write_bytes(b"")
    split = get_layout("mvtec").split(root, "bottle")
    assert [r.image_path.name for r in split.train] == ["000.png", "001.png", "002.png", "010.PNG"]


def test_all_and_named_categories(make_dataset):
    root = make_dataset("mvtec", categories=("cable", "bottle", "screw"))
    layout = get_layout("mvtec")
    assert resolve_categories(layout, root, "all") == ["bottle", "cable", "screw"]
    assert resolve_categories(layout, root, "screw") == ["screw"]
    assert resolve_categories(layout, root, ["screw", "bottle", "screw"]) == ["screw", "bottle"]


def test_unknown_category_lists_available_ones(make_dataset):
    root = make_dataset("mvtec")
    with pytest.raises(DataError) as err:
        resolve_categories(get_layout("mvtec"), root, "screw")
    msg = str(err.value)
    assert "'screw'" in msg and str(root / "screw") in msg and "train/good" in msg
    assert "categories found: bottle, cable" in msg
    with pytest.raises(DataError, match="categories found: bottle, cable"):
        get_layout("mvtec").split(root, "screw")


def test_all_on_a_folder_without_categories(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No MVTec AD category found under"):
        resolve_categories(get_layout("mvtec"), tmp_path / "empty", "all")


def test_wrong_layout_hints_at_single_category_folder(make_dataset):
    root = make_dataset("mvtec", categories=("bottle",))
    with pytest.raises(DataError) as err:
        resolve_categories(get_layout("mvtec"), root / "bottle", "all")
    assert "single category folder" in str(err.value) and "dataset=folder" in str(err.value)


def test_missing_train_good_is_a_layout_error(make_dataset):
    root = make_dataset("mvtec", categories=("bottle",))
    (root / "bottle" / "train" / "good").rename(root / "bottle" / "train" / "normal")
    with pytest.raises(DataError) as err:
        get_layout("folder").split(root / "bottle", "bottle")
    msg = str(err.value)
    assert str(root / "bottle" / "train" / "good") in msg and "normal" in msg


def test_empty_train_good(make_dataset):
    root = make_dataset("mvtec", categories=("bottle",))
    for p in (root / "bottle" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=r"No training images in .*train/good"):
        get_layout("mvtec").split(root, "bottle")


def test_missing_mask_names_the_expected_file(make_dataset):
    root = make_dataset("mvtec", categories=("bottle",))
    (root / "bottle" / "ground_truth" / "hole" / "001_mask.png").unlink()
    with pytest.raises(DataError) as err:
        get_layout("mvtec").split(root, "bottle")
    msg = str(err.value)
    assert str(root / "bottle" / "test" / "hole" / "001.png") in msg
    assert str(root / "bottle" / "ground_truth" / "hole" / "001_mask.png") in msg


def test_missing_ground_truth_folder_for_mvtec(make_dataset):
    root = make_dataset("mvtec", categories=("bottle",))
    shutil.rmtree(root / "bottle" / "ground_truth")
    with pytest.raises(DataError, match="ground_truth"):
        get_layout("mvtec").split(root, "bottle")


def test_btad_ok_ko_and_mixed_extensions(make_dataset):
    root = make_dataset("btad")
    layout = get_layout("btad")
    assert layout.categories(root) == ["01", "02", "03"]
    assert resolve_categories(layout, root, 1) == ["01"]  # YAML reads 01 as the integer 1
    split = layout.split(root, "01")
    assert split.has_masks and len(split.train) == 3
    assert {r.defect_type for r in split.train} == {"ok"}
    bad = [r for r in split.test if r.label == 1]
    assert len(bad) == 2 and {r.defect_type for r in bad} == {"ko"}
    for r in bad:
        assert r.image_path.suffix == ".bmp" and r.mask_path.suffix == ".png"
        assert r.mask_path.stem == r.image_path.stem
    assert all(r.mask_path.suffix == ".bmp" for r in layout.split(root, "03").test if r.label)


def test_mpdd_masks_with_or_without_suffix(make_dataset):
    root = make_dataset("mpdd")
    layout = get_layout("mpdd")
    assert layout.categories(root) == ["bracket_black", "tubes"]
    with_suffix = [r for r in layout.split(root, "bracket_black").test if r.label]
    without = [r for r in layout.split(root, "tubes").test if r.label]
    assert len(with_suffix) == 4 and all(r.mask_path.stem.endswith("_mask") for r in with_suffix)
    assert len(without) == 2 and all(r.mask_path.stem == r.image_path.stem for r in without)


def test_folder_with_and_without_masks(make_dataset):
    root = make_dataset("folder", subdir="my_parts")
    layout = get_layout("folder")
    assert resolve_categories(layout, root, "all") == ["my_parts"]
    assert resolve_categories(layout, root, "widgets") == ["widgets"]
    split = layout.split(root, "widgets")
    assert split.category == "widgets" and split.has_masks
    assert all(r.mask_path is not None for r in split.test if r.label)

    bare = make_dataset("folder", subdir="bare", masks=False)
    split = layout.split(bare, "bare")
    assert not split.has_masks and all(r.mask_path is None for r in split.test)
    assert sum(r.label for r in split.test) == 2


def test_resolve_root_given(make_dataset, tmp_path):
    root = make_dataset("mvtec")
    assert resolve_root("mvtec", root, tmp_path / "unused", []) == root
    with pytest.raises(DataError) as err:
        resolve_root("mvtec", tmp_path / "nope", tmp_path, ["mvtec"])
    assert str(tmp_path / "nope") in str(err.value) and "does not exist" in str(err.value)


def test_resolve_root_searches_data_root(make_dataset, tmp_path):
    make_dataset("mvtec", subdir="mvtec_anomaly_detection")
    (tmp_path / "mvtec").mkdir()  # exists but holds no category: skipped
    got = resolve_root("mvtec", None, tmp_path, ["mvtec", "mvtec_anomaly_detection", "."])
    assert got == tmp_path / "mvtec_anomaly_detection"
    assert resolve_root("mvtec", None, tmp_path / "mvtec_anomaly_detection", ["x", "."]) == (
        tmp_path / "mvtec_anomaly_detection")


def test_resolve_root_lists_candidates_when_nothing_found(tmp_path):
    (tmp_path / "btad").mkdir()
    with pytest.raises(DataError) as err:
        resolve_root("btad", None, tmp_path, ["btad", "BTAD", "."])
    msg = str(err.value)
    for cand in (tmp_path / "btad", tmp_path / "BTAD"):
        assert str(cand) in msg
    assert "ANOMALY_BENCH_DATA" in msg and f"data_root={tmp_path}" in msg


def test_synthetic_layout_reads_the_mvtec_tree(tmp_path):
    from anomaly_bench.data import SYNTHETIC_CATEGORIES, ensure_synthetic

    root = ensure_synthetic(tmp_path / "syn", n_train=1, n_test_good=1, n_test_defect=1, size=32)
    layout = get_layout("synthetic")
    assert layout.categories(root) == sorted(SYNTHETIC_CATEGORIES)
    split = layout.split(root, "rotated_part")
    assert split.has_masks and len(split.train) == 1 and len(split.test) == 4
    assert isinstance(split.test[0].image_path, Path)
