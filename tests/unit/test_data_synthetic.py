"""The synthetic generator: determinism, layout, manifest rotations, reuse and race safety."""

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_bench.data import SYNTHETIC_CATEGORIES, ensure_synthetic, get_layout
from anomaly_bench.data.synthetic import DEFECT_TYPES, read_manifest
from anomaly_bench.errors import DataError

SMALL = {"n_train": 3, "n_test_good": 2, "n_test_defect": 2, "size": 64}


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory):
    """The default dataset, generated once for the module."""
    return ensure_synthetic(tmp_path_factory.mktemp("synthetic_default") / "synthetic")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _files(ensure_synthetic(tmp_path / "a", seed=3, **SMALL))
    b = _files(ensure_synthetic(tmp_path / "b", seed=3, **SMALL))
    c = _files(ensure_synthetic(tmp_path / "c", seed=4, **SMALL))
    assert a == b
    assert a.keys() == c.keys()
    differing = [k for k in a if k.endswith(".png") and a[k] != c[k]]
    assert len(differing) > 0.9 * sum(k.endswith(".png") for k in a)


def test_layout_is_valid_mvtec(default_dataset):
    root = default_dataset
    layout = get_layout("synthetic")
    assert layout.categories(root) == sorted(SYNTHETIC_CATEGORIES)
    for cat in SYNTHETIC_CATEGORIES:
        split = layout.split(root, cat)
        assert split.has_masks and len(split.train) == 32
        assert len(DEFECT_TYPES[cat]) >= 2
        assert sum(r.label == 0 for r in split.test) == 12
        for defect in DEFECT_TYPES[cat]:
            recs = [r for r in split.test if r.defect_type == defect]
            assert len(recs) == 6 and all(r.label == 1 for r in recs)
            for r in recs[:2]:
                img, mask = Image.open(r.image_path), Image.open(r.mask_path)
                assert img.size == mask.size == (256, 256)
                m = np.asarray(mask)
                assert set(np.unique(m).tolist()) == {0, 255}
                assert 4 <= (m > 0).sum() < 0.1 * m.size


def test_manifest_records_every_rotation(default_dataset):
    root = default_dataset
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["version"] >= 1 and manifest["arguments"]["seed"] == 0
    rotations = manifest["categories"]["rotated_part"]["rotations"]
    files = sorted(str(p.relative_to(root / "rotated_part"))
                   for p in (root / "rotated_part").glob("[rt]*/*/*.png"))
    assert sorted(rotations) == files
    assert set(rotations.values()) == {0, 1, 2, 3}
    assert set(manifest["categories"]["stripes"]["rotations"].values()) == {0}


def test_rotation_in_manifest_matches_the_image(default_dataset):
    """Turning an image back by -k puts the part's wide head on the left."""
    root = default_dataset
    rotations = read_manifest(root)["categories"]["rotated_part"]["rotations"]
    for rel, k in list(rotations.items())[:12]:
        img = np.asarray(Image.open(root / "rotated_part" / rel).convert("L"), np.float32)
        upright = np.rot90(img, -k)
        dark = (upright < 150).sum(axis=0)  # part pixels per column
        widest = int(np.argmax(dark))
        cols = np.flatnonzero(dark > 3)
        assert widest < (cols[0] + cols[-1]) / 2, rel


def test_reuse_and_regenerate(tmp_path):
    root = ensure_synthetic(tmp_path / "s", seed=0, **SMALL)
    stamp = (root / "manifest.json").stat().st_mtime_ns
    assert ensure_synthetic(root, seed=0, **SMALL) == root
    assert (root / "manifest.json").stat().st_mtime_ns == stamp
    ensure_synthetic(root, seed=1, **SMALL)
    assert read_manifest(root)["arguments"]["seed"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary folders left


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="will not be overwritten"):
        ensure_synthetic(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"


def test_concurrent_generation_is_safe(tmp_path):
    root = tmp_path / "raced"
    barrier = threading.Barrier(3)
    results, errors = [], []

    def run():
        try:
            barrier.wait()
            results.append(ensure_synthetic(root, seed=5, **SMALL))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [root] * 3
    assert [p.name for p in tmp_path.iterdir()] == ["raced"]
    assert _files(root) == _files(ensure_synthetic(tmp_path / "ref", seed=5, **SMALL))


def test_losing_the_rename_race_keeps_the_winners_dataset(tmp_path, monkeypatch):
    from anomaly_bench.data import synthetic

    args = synthetic._args(seed=0, **SMALL)
    theirs = ensure_synthetic(tmp_path / "theirs", **SMALL)
    root, tmp = tmp_path / "root", tmp_path / ".root.tmp"
    tmp.mkdir()
    synthetic._generate(tmp, args)
    real_rename = synthetic.os.rename

    def rename(src, dst):
        if Path(src) == tmp and not root.exists():
            real_rename(theirs, root)  # the other process publishes first
        return real_rename(src, dst)

    monkeypatch.setattr(synthetic.os, "rename", rename)
    synthetic._publish(tmp, root, args)
    assert synthetic._matches(root, args) and tmp.is_dir()  # ours is left for the caller
