"""ORB rotation alignment: correct quarter turns on the synthetic rotated part, fallbacks."""

import json

import numpy as np
import pytest
from PIL import Image

from anomaly_bench.alignment.orb import build_aligner, rotate_pil
from anomaly_bench.data import ensure_synthetic
from anomaly_bench.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def part(tmp_path_factory):
    root = ensure_synthetic(tmp_path_factory.mktemp("syn") / "synthetic", seed=0)
    cat = root / "rotated_part"
    turns = json.loads((root / "manifest.json").read_text())["categories"]["rotated_part"]
    return cat, turns["rotations"]


def test_chosen_rotation_is_correct_for_at_least_95_percent(part):
    cat, turns = part
    train = sorted((cat / "train" / "good").glob("*.png"))
    paths = sorted(cat.glob("t*/*/*.png"))
    res = build_aligner({"name": "orb90"}, train).align_all(paths)
    k_ref = turns["train/good/000.png"]
    # turning image i by (k_ref - k_i) quarter turns gives it the reference's orientation
    correct = [res.rotations[str(p)] == (k_ref - turns[str(p.relative_to(cat))]) % 4
               for p in paths]
    assert len(paths) == 62 and len({turns[k] for k in turns}) == 4  # all four turns occur
    assert np.mean(correct) >= 0.95, np.mean(correct)
    aligned = [np.rot90(np.asarray(Image.open(p)), res.rotations[str(p)]) for p in paths[:5]]
    assert all(a.shape == aligned[0].shape for a in aligned)


def test_blank_image_falls_back_to_no_rotation(part, tmp_path):
    cat, _ = part
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(blank)
    aligner = build_aligner({"name": "orb90"}, sorted((cat / "train" / "good").glob("*.png")))
    res = aligner.align_all([blank])
    assert res.rotations[str(blank)] == 0 and res.fallbacks == [str(blank)]


@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_rotate_pil_equals_rot90(k, mode):
    rng = np.random.default_rng(k)
    arr = rng.integers(0, 256, (5, 7, 3) if mode == "RGB" else (5, 7), dtype=np.uint8)
    got = np.asarray(rotate_pil(Image.fromarray(arr, mode), k))
    assert np.array_equal(got, np.rot90(arr, k))


def test_build_aligner_reference_choices_and_errors(part, tmp_path):
    cat, _ = part
    train = sorted((cat / "train" / "good").glob("*.png"))
    assert build_aligner({"name": "none"}, train) is None
    for ref in (None, 3, str(train[5])):
        assert build_aligner({"name": "orb90", "reference": ref}, train) is not None
    with pytest.raises(ConfigError, match=r"alignment\.reference=99"):
        build_aligner({"name": "orb90", "reference": 99}, train)
    with pytest.raises(DataError, match="does not exist"):
        build_aligner({"name": "orb90", "reference": str(tmp_path / "nope.png")}, train)
    with pytest.raises(ConfigError, match="unknown"):
        build_aligner({"name": "sift"}, train)
    flat = tmp_path / "flat.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(flat)
    with pytest.raises(DataError, match="keypoints"):
        build_aligner({"name": "orb90", "reference": str(flat)}, train)
