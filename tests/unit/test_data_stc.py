"""ShanghaiTech Campus layout: scenes, frame sampling, labels, mask materialisation, errors."""

import numpy as np
import pytest
from fixtures import preprocess, write_stc
from PIL import Image

from anomaly_bench.data import get_layout, make_loader
from anomaly_bench.errors import ConfigError, DataError


@pytest.fixture
def stc(tmp_path):
    return write_stc(tmp_path / "shanghaitech")


def test_scenes_frames_labels_and_masks(stc):
    layout = get_layout("stc")
    assert layout.categories(stc) == ["01", "02"]
    split = layout.configure({"frame_stride": 5}).split(stc, "01")
    assert len(split.train) == 3  # frames 0, 5, 10 of 12
    assert [r.label for r in split.test] == [0, 0, 0, 1, 1, 1]
    assert {r.subset for r in split.test} == {"01_0014"}
    pixel = np.load(stc / "testing" / "test_pixel_mask" / "01_0014.npy")
    for i, rec in enumerate(split.test):
        if rec.label:
            mask = np.asarray(Image.open(rec.mask_path)) > 0
            assert np.array_equal(mask, pixel[i] > 0)
        else:
            assert rec.mask_path is None
    assert len(layout.configure({"frame_stride": 1}).split(stc, "01").train) == 12


def test_cache_is_reused(stc):
    layout = get_layout("stc")
    first = layout.split(stc, "02")
    stamp = first.train[0].image_path.stat().st_mtime_ns
    second = layout.split(stc, "02")
    assert second.train[0].image_path == first.train[0].image_path
    assert second.train[0].image_path.stat().st_mtime_ns == stamp


def test_loader_reads_frames_and_masks(stc):
    split = get_layout("stc").split(stc, "01")
    batch = next(iter(make_loader(split.test, preprocess(size=32, crop=None), 6, 0,
                                  with_masks=True)))
    assert batch.images.shape == (6, 3, 32, 32) and batch.masks.shape == (6, 1, 32, 32)
    assert batch.masks[:3].sum() == 0 and (batch.masks[3:].flatten(1).sum(1) == 64).all()


def test_errors_name_the_file(stc):
    layout = get_layout("stc")
    (stc / "testing" / "test_frame_mask" / "01_0014.npy").unlink()
    with pytest.raises(DataError, match="test_frame_mask"):
        layout.split(stc, "01")
    np.save(stc / "testing" / "test_frame_mask" / "02_0014.npy", np.zeros(4))
    with pytest.raises(DataError, match="4 frame labels"):
        layout.split(stc, "02")
    with pytest.raises(DataError, match="scene 07"):
        layout.split(stc, "07")
    with pytest.raises(ConfigError, match="frame_stride"):
        layout.configure({"frame_stride": 0})


def test_pixel_mask_shape_mismatch(tmp_path):
    root = write_stc(tmp_path / "s", scenes=("03",))
    np.save(root / "testing" / "test_pixel_mask" / "03_0014.npy", np.zeros((6, 8, 8)))
    with pytest.raises(DataError, match="expected"):
        get_layout("stc").split(root, "03")


def test_unreadable_video(tmp_path):
    root = write_stc(tmp_path / "s", scenes=("04",))
    (root / "training" / "videos" / "04_001.avi").write_bytes(b"not a video")
    with pytest.raises(DataError, match=r"04_001\.avi"):
        get_layout("stc").split(root, "04")
