"""Preprocessing, items, batches and the user-facing errors of image and mask loading."""

import dataclasses

import numpy as np
import pytest
import torch
from fixtures import preprocess, write_gray16, write_image, write_mask
from PIL import Image

from anomaly_bench.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from anomaly_bench.data import (
    RecordDataset,
    denormalize,
    get_layout,
    make_loader,
)
from anomaly_bench.data.loading import image_sizes, read_image
from anomaly_bench.errors import ConfigError, DataError
from anomaly_bench.types import Batch, SampleRecord


@pytest.mark.parametrize(
    ("size", "crop", "native", "expected"),
    [(256, 224, (30, 40), (224, 224)), (256, None, (30, 40), (256, 256)),
     (None, None, (30, 40), (30, 40)), (None, 20, (30, 40), (20, 20))],
)
def test_preprocess_output_shapes(tmp_path, size, crop, native, expected):
    h, w = native
    img = Image.open(write_image(tmp_path / "a.png", size=(w, h)))
    mask = Image.open(write_mask(tmp_path / "m.png", size=(w, h)))
    pre = preprocess(size=size, crop=crop)
    assert pre.output_size(native) == expected
    x, m = pre.image(img), pre.mask(mask)
    assert x.shape == (3, *expected) and x.dtype == torch.float32
    assert m.shape == (1, *expected) and set(m.unique().tolist()) <= {0.0, 1.0}


def test_crop_larger_than_image_is_a_config_error():
    with pytest.raises(ConfigError, match="crop=300"):
        preprocess(size=256, crop=300).output_size((10, 10))
    with pytest.raises(ConfigError):
        preprocess(size=0)


def test_normalisation_and_denormalize_round_trip(tmp_path):
    arr = np.full((8, 8, 3), (255, 128, 0), np.uint8)
    pre = preprocess(size=None, crop=None)
    x = pre.image(Image.fromarray(arr))
    stats = zip((255, 128, 0), IMAGENET_MEAN, IMAGENET_STD, strict=True)
    want = [(v / 255 - m) / s for v, m, s in stats]
    assert torch.allclose(x[:, 0, 0], torch.tensor(want), atol=1e-5)
    back = denormalize(x[None], pre)
    assert back.shape == (1, 8, 8, 3) and back.dtype == np.uint8
    assert np.array_equal(back[0], arr)


def test_center_crop_matches_the_mask_geometry(tmp_path):
    # a defect square at the centre of a 64x64 image stays centred after 32 resize + 16 crop
    img = write_image(tmp_path / "a.png", size=(64, 64))
    mask = write_mask(tmp_path / "m.png", size=(64, 64), box=(24, 24, 40, 40))
    pre = preprocess(size=32, crop=16)
    m = pre.mask(Image.open(mask))[0]
    assert m[4:12, 4:12].all() and m.sum() == 64
    assert pre.image(Image.open(img)).shape == (3, 16, 16)


def test_grayscale_becomes_three_channels(tmp_path):
    path = write_image(tmp_path / "g.png", mode="L")
    item = RecordDataset([SampleRecord(path, 0)], preprocess(None, None))[0]
    x = item["image"]
    assert x.shape == (3, 32, 32)
    raw = torch.from_numpy(np.asarray(Image.open(path), np.float32) / 255)
    for c in range(3):
        assert torch.allclose(x[c] * IMAGENET_STD[c] + IMAGENET_MEAN[c], raw, atol=1e-5)


def test_sixteen_bit_grayscale_is_scaled(tmp_path):
    arr = np.full((4, 4), 65535, np.uint16)
    Image.fromarray(arr).save(tmp_path / "w.png")
    x = RecordDataset([SampleRecord(tmp_path / "w.png", 0)], preprocess(None, None))[0]["image"]
    assert torch.allclose(x[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0], torch.ones(4, 4), atol=1e-5)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_dark_sixteen_bit_image_is_scaled_by_bit_depth(tmp_path, ext):
    arr = np.zeros((4, 4), np.uint16)
    arr[0, 0], arr[1, 1] = 1000, 500
    path = write_gray16(tmp_path / f"dark{ext}", arr)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I")  # Pillow 10+: I;16; older: I
    rgb = np.asarray(read_image(path))
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [4, 4, 4]  # round(1000 * 255 / 65535), not 255
    assert rgb[1, 1].tolist() == [2, 2, 2] and rgb[2, 2].tolist() == [0, 0, 0]


@pytest.mark.parametrize("dark_max", [250, 1000])
def test_same_sixteen_bit_value_gives_the_same_eight_bit_value(tmp_path, dark_max):
    dark = np.full((4, 4), 200, np.uint16)
    bright = np.full((4, 4), 200, np.uint16)
    dark[0, 0], bright[0, 0] = dark_max, 60000
    a = np.asarray(read_image(write_gray16(tmp_path / "a.png", dark)))
    b = np.asarray(read_image(write_gray16(tmp_path / "b.png", bright)))
    assert a[1, 1, 0] == b[1, 1, 0] == 1  # round(200 * 255 / 65535)
    assert a[0, 0, 0] == round(dark_max * 255 / 65535) and b[0, 0, 0] == 233


def test_mode_i_and_float_images_use_fixed_scales():
    pre = preprocess(None, None)

    def eight_bit(im):
        x = pre.image(im)[0]
        return torch.round((x * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255).int().tolist()

    as_i = Image.fromarray(np.array([[0, 1000, 65535, 70000]], np.int32))
    assert as_i.mode == "I"
    assert eight_bit(as_i) == [[0, 4, 255, 255]]
    as_f = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0, -1.0, np.nan]], np.float32))
    assert as_f.mode == "F"
    assert eight_bit(as_f) == [[0, 128, 255, 255, 0, 0]]


def test_loader_yields_batches_with_masks(make_dataset):
    root = make_dataset("mvtec", categories=("bottle",))
    split = get_layout("mvtec").split(root, "bottle")
    batches = list(make_loader(split.test, preprocess(64, 48), batch_size=4))
    assert [len(b.paths) for b in batches] == [4, 2]
    batch = batches[0]
    assert isinstance(batch, Batch)
    assert batch.images.shape == (4, 3, 48, 48) and batch.masks.shape == (4, 1, 48, 48)
    # test folders in name order: crack, good, hole
    assert batch.labels.tolist() == [1, 1, 0, 0] and batch.rotations.tolist() == [0, 0, 0, 0]
    assert batch.defect_types == ["crack", "crack", "good", "good"]
    assert batch.masks[2:].sum() == 0 and (batch.masks[:2].sum((1, 2, 3)) > 0).all()
    assert set(batch.masks.unique().tolist()) == {0.0, 1.0}
    no_masks = next(iter(make_loader(split.test, preprocess(64, 48), 4, with_masks=False)))
    assert no_masks.masks is None


def test_transform_hook_turns_image_and_mask(tmp_path):
    img = write_image(tmp_path / "a.png")
    mask = write_mask(tmp_path / "m.png", box=(0, 0, 8, 4))  # top-left strip
    rec = SampleRecord(img, 1, "crack", mask)

    def quarter_turn(image, m, record):
        assert record is rec
        return image.transpose(Image.Transpose.ROTATE_90), m.transpose(Image.Transpose.ROTATE_90), 1

    pre = preprocess(None, None)
    batch = next(iter(make_loader([rec], pre, 1, transform_pil=quarter_turn)))
    plain = next(iter(make_loader([rec], pre, 1)))
    assert batch.rotations.tolist() == [1]
    assert torch.equal(batch.images, torch.rot90(plain.images, 1, (2, 3)))
    assert torch.equal(batch.masks, torch.rot90(plain.masks, 1, (2, 3)))


def test_truncated_png_names_the_file(tmp_path):
    path = write_image(tmp_path / "cut.png", size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    loader = make_loader([SampleRecord(path, 0)], preprocess(None, None), 1)
    with pytest.raises(DataError) as err:
        next(iter(loader))
    assert str(path) in str(err.value)


def test_unreadable_image_names_the_file(tmp_path):
    path = tmp_path / "junk.png"
    path.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"junk\.png"):
        RecordDataset([SampleRecord(path, 0)], preprocess())[0]


def test_mask_size_mismatch(tmp_path):
    img = write_image(tmp_path / "img.png", size=(64, 64))
    mask = write_mask(tmp_path / "img_mask.png", size=(100, 80))
    ds = RecordDataset([SampleRecord(img, 1, "crack", mask)], preprocess())
    with pytest.raises(DataError) as err:
        ds[0]
    assert f"mask {mask} is 100x80 but image {img} is 64x64" in str(err.value).lower()


def test_anomalous_record_without_mask_when_masks_expected(tmp_path):
    img = write_image(tmp_path / "img.png")
    ds = RecordDataset([SampleRecord(img, 1, "crack")], preprocess(), with_masks=True)
    with pytest.raises(DataError, match=r"img\.png has no mask"):
        ds[0]
    assert "mask" not in RecordDataset([SampleRecord(img, 1)], preprocess(), False)[0]


def test_mixed_native_sizes_in_a_batch(tmp_path):
    a = write_image(tmp_path / "a.png", size=(32, 32))
    b = write_image(tmp_path / "b.png", size=(40, 32))
    loader = make_loader([SampleRecord(a, 0), SampleRecord(b, 0)], preprocess(None, None), 2)
    with pytest.raises(DataError, match=r"resolution\.size"):
        next(iter(loader))


def test_worker_errors_keep_their_message(tmp_path):
    path = tmp_path / "junk.png"
    path.write_bytes(b"\x89PNG broken")
    loader = make_loader([SampleRecord(path, 0)], preprocess(None, None), 1, num_workers=1)
    with pytest.raises(DataError) as err:
        next(iter(loader))
    msg = str(err.value)
    assert msg.startswith(f"Cannot read image {path}") and "Traceback" not in msg


def test_resampling_filters_are_pil_s_and_bilinear_masks_are_thresholded_at_half(tmp_path):
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    mask = np.zeros((37, 53), np.uint8)
    mask[10:14, 20:23] = 255  # a small defect: bilinear then > 0.5 keeps less than nearest
    base = preprocess(size=16, crop=None)
    for name, flt in (("bilinear", Image.Resampling.BILINEAR),
                      ("bicubic", Image.Resampling.BICUBIC)):
        pre = dataclasses.replace(base, resample=name)
        want = np.asarray(Image.fromarray(arr).resize((16, 16), flt), np.float32)
        got = pre.image(Image.fromarray(arr)).permute(1, 2, 0).numpy()
        got = got * np.array(IMAGENET_STD) * 255 + np.array(IMAGENET_MEAN) * 255
        np.testing.assert_allclose(got, want, atol=1e-3)
    resized = np.asarray(Image.fromarray(mask).resize((16, 16), Image.Resampling.BILINEAR))
    soft = dataclasses.replace(base, mask_resample="bilinear").mask(Image.fromarray(mask))
    assert torch.equal(soft[0], torch.from_numpy((resized > 127).astype(np.float32)))
    hard = base.mask(Image.fromarray(mask))[0]
    near = np.asarray(Image.fromarray(mask).resize((16, 16), Image.Resampling.NEAREST)) > 0
    assert torch.equal(hard, torch.from_numpy(near.astype(np.float32)))
    assert soft.sum() != hard.sum()  # the two conventions differ on a small defect
    with pytest.raises(ConfigError, match="resample='lanczos'"):
        dataclasses.replace(base, resample="lanczos")


# ---------------------------------------------------------------------- float and EXIF
def _float_tiff(path, arr):
    Image.fromarray(np.asarray(arr, np.float32)).save(path)
    return path


def test_a_float_image_holding_0_255_values_is_read_as_such(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 255, (16, 16))
    got = np.asarray(read_image(_float_tiff(tmp_path / "a.tif", values)))[..., 0]
    assert np.array_equal(got, np.round(values).astype(np.uint8))  # not saturated
    unit = np.asarray(read_image(_float_tiff(tmp_path / "b.tif", values / 255)))[..., 0]
    assert np.abs(unit.astype(int) - got).max() <= 1  # 0..1 images are scaled to 0..255


@pytest.mark.parametrize(("bad", "needle"), [
    (np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"), (-0.5, "-0.5"),
    (300.0, "300"),
])
def test_a_float_image_out_of_range_is_refused_naming_the_file(tmp_path, bad, needle):
    arr = np.full((8, 8), 0.5)
    arr[3, 4] = bad
    path = _float_tiff(tmp_path / "bad.tif", arr)
    with pytest.raises(DataError) as err:
        read_image(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def _exif_rotated(path, upright: np.ndarray, orientation: int = 6):
    """A JPEG whose stored pixels are ``upright`` turned so that a viewer applying EXIF
    ``orientation`` (6: rotate 90 degrees clockwise to display) shows ``upright``."""
    stored = np.rot90(upright, 1)  # 6: the stored image is the upright one turned CCW
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(stored)).save(path, quality=95, exif=exif)
    return path


@pytest.mark.parametrize("shape", [(48, 32), (40, 40)])
def test_exif_orientation_turns_images_and_their_masks_alike(tmp_path, shape):
    h, w = shape
    upright = np.full((h, w, 3), 60, np.uint8)
    upright[4:14, 6:16] = 250  # the defect as the photo is seen (and the mask drawn)
    mask = np.zeros((h, w), np.uint8)
    mask[4:14, 6:16] = 255
    image_path = _exif_rotated(tmp_path / "img.jpg", upright)
    mask_path = write_png_mask(tmp_path / "img_mask.png", mask)
    assert image_sizes([image_path]) == {(w, h): [image_path]}
    rec = SampleRecord(image_path, 1, "crack", mask_path)
    item = RecordDataset([rec], preprocess(None, None), with_masks=True)[0]
    bright = denormalize(item["image"][None], preprocess(None, None))[0, ..., 0] > 200
    assert item["mask"].shape[-2:] == (h, w)
    assert np.array_equal(bright, item["mask"][0].numpy() > 0)


def write_png_mask(path, arr):
    Image.fromarray(arr).save(path)
    return path
