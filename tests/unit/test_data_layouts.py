"""Dataset layouts read from tiny fixtures: records, labels, mask pairing and error messages."""

import logging
import os
import shutil
from pathlib import Path

import pytest
from fixtures import write_broken_symlinks, write_stc

from anomaly_bench.data import (
    LAYOUTS,
    available_layouts,
    get_layout,
    register_layout,
    resolve_categories,
    resolve_root,
)
from anomaly_bench.data.loading import read_image
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


# ---------------------------------------------------------------------- symlinks
def _symlink_warnings(caplog, folder):
    return [r for r in caplog.records if r.name == "anomaly_bench"
            and r.levelno == logging.WARNING and r.getMessage().startswith(f"{folder}:")]


def test_broken_image_symlinks_are_skipped_with_their_count(make_dataset, caplog):
    root = make_dataset("mvtec", categories=("bottle",))
    train = root / "bottle" / "train" / "good"
    dangling, _ = write_broken_symlinks(train)
    (train / "003.png").symlink_to(train / "000.png")  # a link to a real image still counts
    with caplog.at_level(logging.WARNING, logger="anomaly_bench"):
        split = get_layout("mvtec").split(root, "bottle")
    names = [r.image_path.name for r in split.train]
    assert names == ["000.png", "001.png", "002.png", "003.png"]
    assert read_image(train / "003.png").size == (32, 32)
    warned = _symlink_warnings(caplog, train)
    assert len(warned) == 1
    assert warned[0].getMessage() == (
        f"{train}: 2 dangling or looping symlinks skipped (e.g. {dangling})")
    assert not _symlink_warnings(caplog, root / "bottle" / "test" / "good")


def test_looping_mask_symlinks_are_reported(make_dataset, caplog):
    root = make_dataset("mvtec", categories=("bottle",))
    masks = root / "bottle" / "ground_truth" / "crack"
    first, _ = write_broken_symlinks(masks, pair=True)
    with caplog.at_level(logging.WARNING, logger="anomaly_bench"):
        split = get_layout("mvtec").split(root, "bottle")
    assert all("loop" not in r.mask_path.name for r in split.test if r.mask_path)
    [warned] = _symlink_warnings(caplog, masks)
    assert "2 dangling or looping symlinks skipped" in warned.getMessage()
    assert str(first) in warned.getMessage()


# ---------------------------------------------------------------------- unreadable folders
def _deny_listing(monkeypatch, denied: Path) -> None:
    """Make ``Path.iterdir`` fail with PermissionError for ``denied`` only."""
    real = Path.iterdir

    def iterdir(self):
        if self == denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)


def test_unreadable_image_folder_is_a_data_error(make_dataset, monkeypatch):
    root = make_dataset("mvtec", categories=("bottle",))
    train = root / "bottle" / "train" / "good"
    _deny_listing(monkeypatch, train)
    with pytest.raises(DataError) as err:
        get_layout("mvtec").split(root, "bottle")
    msg = str(err.value)
    assert msg.startswith(f"Cannot read the folder {train}: Permission denied.")
    assert "normal training images" in msg and "\n" not in msg


@pytest.mark.parametrize("where", ["root", "test", "masks"])
def test_unreadable_folders_of_the_tree(make_dataset, monkeypatch, where):
    root = make_dataset("mvtec", categories=("bottle",))
    denied = {"root": root, "test": root / "bottle" / "test",
              "masks": root / "bottle" / "ground_truth" / "hole"}[where]
    _deny_listing(monkeypatch, denied)
    with pytest.raises(DataError, match=f"Cannot read the folder {denied}: Permission denied"):
        if where == "root":
            resolve_categories(get_layout("mvtec"), root, "all")
        else:
            get_layout("mvtec").split(root, "bottle")


def test_uninspectable_folder_of_the_tree_is_a_data_error(make_dataset, monkeypatch):
    root = make_dataset("mvtec", categories=("bottle",))
    gt = root / "bottle" / "ground_truth"
    real = Path.is_dir

    def is_dir(self):
        if self == gt:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "is_dir", is_dir)
    with pytest.raises(DataError) as err:
        get_layout("mvtec").split(root, "bottle")
    assert str(err.value).startswith(
        f"Cannot read the folder {root / 'bottle'}: Permission denied ({gt}).")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode")
def test_chmod_000_folder_is_a_data_error(make_dataset):
    root = make_dataset("mvtec", categories=("bottle",))
    train = root / "bottle" / "train" / "good"
    train.chmod(0)
    try:
        with pytest.raises(DataError, match=f"Cannot read the folder {train}"):
            get_layout("mvtec").split(root, "bottle")
    finally:
        train.chmod(0o755)


# ---------------------------------------------------------------------- category names
@pytest.mark.parametrize("bad", ["../../x", "/abs/path", "a/b", "..", ".", "a\\b"])
@pytest.mark.parametrize("layout_name", ["folder", "mvtec"])
def test_category_names_that_are_not_plain_are_refused(make_dataset, bad, layout_name):
    root = make_dataset(layout_name)
    with pytest.raises(ConfigError, match=r"dataset\.category="):
        resolve_categories(get_layout(layout_name), root, bad)
    with pytest.raises(ConfigError, match=r"dataset\.category="):
        resolve_categories(get_layout(layout_name), root, ["bottle", bad])
    with pytest.raises(ConfigError, match=r"dataset\.category="):
        get_layout(layout_name).split(root, bad)


def test_plain_category_names_still_work(make_dataset):
    root = make_dataset("folder")
    assert resolve_categories(get_layout("folder"), root, "widgets") == ["widgets"]
    assert resolve_categories(get_layout("folder"), root, "all") == ["folder"]
    assert resolve_categories(get_layout("folder"), root / "test" / "..", "all") == ["folder"]


class _Stub:
    name = "stub"

    def __init__(self, found):
        self.found = found
        self.listed = 0

    def categories(self, root):
        self.listed += 1
        return list(self.found)

    def split(self, root, category):
        raise AssertionError("not reached")


def test_requested_names_are_checked_before_the_layout_lists(tmp_path):
    stub = _Stub(["ok"])
    with pytest.raises(ConfigError, match=r"dataset\.category='\.\./x'"):
        resolve_categories(stub, tmp_path, "../x")
    assert stub.listed == 0
    assert resolve_categories(stub, tmp_path, "ok") == ["ok"] and stub.listed == 1


@pytest.mark.parametrize("found", ["..", "a/b", ""])
def test_category_names_found_by_a_layout_are_checked(tmp_path, found):
    with pytest.raises(ConfigError, match=f"found under {tmp_path}"):
        resolve_categories(_Stub(["ok", found]), tmp_path, "all")


def test_stc_clip_names_become_subsets_only_when_plain(tmp_path, monkeypatch):
    import anomaly_bench.data.stc as stc

    root = write_stc(tmp_path / "stc", scenes=("01",))
    with pytest.raises(ConfigError, match=r"dataset\.category="):
        get_layout("stc").split(root, "../01")
    real = stc.list_subdirs
    monkeypatch.setattr(stc, "list_subdirs", lambda folder, what="": [*real(folder, what), ".."])
    with pytest.raises(ConfigError, match="test clip folder"):
        get_layout("stc").split(root, "01")
