"""From sample records to batches: image reading, preprocessing, masks and the DataLoader.

Images are read with PIL and fully decoded (a truncated file is an error, never silently
padded), turned upright as their EXIF orientation says (masks too, so a mask drawn on the
photo as it is shown fits it), turned into RGB, resized to ``size x size`` with PIL's
anti-aliased bilinear (or bicubic) filter, centre-cropped and normalised. Masks follow the
same geometry (nearest resampling, or bilinear thresholded at one half). No torchvision:
the same code runs wherever torch and Pillow do.

Pixel formats: 8-bit (L, P, RGB, RGBA, ... through PIL's RGB conversion), 16-bit
grayscale (``I;16``, ``I``: scaled by the bit depth, 0..65535 to 0..255) and 32-bit float
grayscale (``F``, e.g. TIFF): values within [0, 1] are read as 0..1, otherwise as 0..255;
a float image with NaN, infinity, a negative value or one above 255 is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from anomaly_bench.errors import AnomalyBenchError, ConfigError, DataError
from anomaly_bench.memo import MEMO, attach_row_keys, content_key, file_stamp
from anomaly_bench.types import ANOMALOUS, Batch, SampleRecord

#: ``transform_pil(image, mask, record)`` -> ``(image, mask)`` or ``(image, mask, k)``: applied
#: to the native-size PIL image and mask (None when there is none) before preprocessing,
#: e.g. by alignment to rotate both; ``k`` (quarter turns applied) goes to ``Batch.rotations``.
#: A transform with a ``key(record)`` method (a hashable naming what it does to that record)
#: lets loaded items be memoised; one without is applied afresh every time.
TransformPil = Callable[
    [Image.Image, Image.Image | None, SampleRecord],
    tuple[Image.Image, Image.Image | None] | tuple[Image.Image, Image.Image | None, int],
]


# ---------------------------------------------------------------------- reading
#: Grayscale modes scaled from the 16-bit range; Pillow opens 16-bit PNG/TIFF as ``I;16``
#: (older versions: ``I``).
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB copy of a loaded image; grayscale deeper than 8 bits is scaled by its bit depth.

    16-bit modes map 0..65535 to 0..255 and float images (mode ``F``) map 0..1 to 0..255,
    rounded and clipped (NaN becomes 0). The scale never depends on the image's content, so
    a raw value gives the same 8-bit value in every image and a dark image stays dark.
    """
    if im.mode in SIXTEEN_BIT_MODES or im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 if im.mode == "F" else 255.0 / 65535.0
        arr = np.nan_to_num(np.round(arr * scale), nan=0.0, posinf=255.0, neginf=0.0)
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return im.convert("RGB")


#: EXIF orientations that swap width and height (a quarter turn, with or without a flip).
_QUARTER_TURNS = (5, 6, 7, 8)


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation of ``im`` (1 = upright as stored), read from its header."""
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # an unreadable EXIF block: the pixels are taken as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def oriented_size(im: Image.Image) -> tuple[int, int]:
    """(W, H) of ``im`` as it is shown: its header size, swapped by a quarter-turn EXIF
    orientation (no pixel is decoded)."""
    w, h = int(im.size[0]), int(im.size[1])
    return (h, w) if _orientation(im) in _QUARTER_TURNS else (w, h)


def _upright(im: Image.Image) -> Image.Image:
    """``im`` turned and flipped as its EXIF orientation says (itself when upright)."""
    return ImageOps.exif_transpose(im) if _orientation(im) != 1 else im


def _float_to_8bit(im: Image.Image, path: Path) -> Image.Image:
    """An 8-bit image of a float image file: 0..1 scaled to 0..255 when every value is
    within [0, 1], else the values taken as 0..255; DataError for NaN, infinity or values
    outside [0, 255]."""
    arr = np.asarray(im, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise DataError(f"Image {path} is a float image holding NaN or infinite values; "
                        "expected finite values in 0..1 or 0..255.")
    lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
    if lo < 0 or hi > 255:
        raise DataError(
            f"Image {path} is a float image with values from {lo:g} to {hi:g}; float images "
            "are read as 0..1 (every value within [0, 1]) or as 0..255: rescale it to one "
            "of those ranges, or save it as an 8- or 16-bit image."
        )
    scale = 255.0 if hi <= 1.0 else 1.0
    return Image.fromarray(np.clip(np.round(arr * scale), 0, 255).astype(np.uint8))


def read_image(path: str | Path) -> Image.Image:
    """The image at ``path`` as a fully decoded, upright RGB PIL image; DataError naming
    the file (see the module docstring for the pixel formats)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            upright = _upright(im)
            if upright.mode == "F":
                upright = _float_to_8bit(upright, path)
            return _to_rgb(upright)
    except FileNotFoundError:
        raise DataError(f"Image {path} does not exist (it was listed by the dataset).") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"Cannot read image {path}: {exc}. Expected a complete PNG/JPEG/BMP/TIFF file; "
            f"the file may be truncated or corrupt (re-extract or re-download the dataset)."
        ) from None


def read_mask(path: str | Path, image_size: tuple[int, int], image_path: str | Path) -> Image.Image:
    """The mask at ``path`` as an 'L' image with 0/255 (non-zero = defect), upright as its
    EXIF orientation says.

    Its size as shown is checked against ``image_size`` (W, H, the upright image's) from
    the header, before decoding.
    """
    path = Path(path)
    try:
        with Image.open(path) as m:
            size = oriented_size(m)
            if size != tuple(image_size):
                raise DataError(
                    f"Mask {path} is {size[0]}x{size[1]} but image {image_path} is "
                    f"{image_size[0]}x{image_size[1]}: a mask must have the size of its image."
                )
            m.load()
            arr = np.asarray(_upright(m))
            if m.mode in ("RGBA", "LA", "PA", "La"):
                arr = arr[..., :-1]
    except FileNotFoundError:
        raise DataError(f"Mask {path} of image {image_path} does not exist.") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"Cannot read mask {path} (of image {image_path}): {exc}. Expected a complete "
            f"image file; it may be truncated or corrupt."
        ) from None
    binary = arr.any(axis=-1) if arr.ndim == 3 else arr > 0
    return Image.fromarray(binary.astype(np.uint8) * 255)


def image_sizes(paths: Sequence[str | Path]) -> dict[tuple[int, int], list[Path]]:
    """``{(W, H): paths}`` of the images as shown (EXIF orientation applied), read from
    their headers only (no pixel is decoded)."""
    out: dict[tuple[int, int], list[Path]] = {}
    for path in paths:
        try:
            with Image.open(path) as im:
                size = oriented_size(im)
        except FileNotFoundError:
            raise DataError(f"Image {path} does not exist (it was listed by the dataset).") \
                from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"Cannot read the header of image {path}: {exc}. Expected a "
                            "PNG/JPEG/BMP/TIFF file.") from None
        out.setdefault(size, []).append(Path(path))
    return out


# ---------------------------------------------------------------------- preprocessing
#: Image and mask resampling filters by config name (``method.input_resample``,
#: ``method.mask_resample``).
IMAGE_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
MASK_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class Preprocess:
    """Resize to ``size`` x ``size`` (None = native), centre-crop ``crop`` (None = none), and
    normalise with ``mean`` and ``std``: the backbone's own input statistics
    (:attr:`~anomaly_bench.backbones.base.Backbone.mean`), which the runner passes.

    ``resample`` is PIL's filter for images (``bilinear``, as torchvision's default
    transforms; ``bicubic``, as CLIP's preprocessing), both anti-aliased when shrinking;
    ``mask_resample`` the one for masks: ``nearest`` (the mask stays binary) or
    ``bilinear`` followed by a threshold at half the defect value (APRIL-GAN's code).
    """

    size: int | None
    crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str
    mask_resample: str

    def __post_init__(self) -> None:
        for key in ("size", "crop"):
            val = getattr(self, key)
            if val is not None and (isinstance(val, bool) or int(val) != val or int(val) < 1):
                raise ConfigError(f"resolution.{key}={val!r} must be a positive integer or null.")
            if val is not None:
                object.__setattr__(self, key, int(val))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        for key, allowed in (("resample", IMAGE_FILTERS), ("mask_resample", MASK_FILTERS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not one of "
                                  f"{', '.join(allowed)}.")

    def output_size(self, native_hw: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of a preprocessed image whose native size is ``native_hw``."""
        h, w = (self.size, self.size) if self.size is not None else tuple(native_hw)
        if self.crop is not None:
            if self.crop > h or self.crop > w:
                raise ConfigError(
                    f"resolution.crop={self.crop} is larger than the {w}x{h} image it crops "
                    f"(resolution.size={self.size}): lower the crop or raise the size."
                )
            h = w = self.crop
        return int(h), int(w)

    def _geometry(self, pil: Image.Image, resample: Image.Resampling) -> Image.Image:
        if self.size is not None and pil.size != (self.size, self.size):
            pil = pil.resize((self.size, self.size), resample)
        if self.crop is not None:
            w, h = pil.size
            self.output_size((h, w))  # validates crop <= size
            top = round((h - self.crop) / 2.0)
            left = round((w - self.crop) / 2.0)
            pil = pil.crop((left, top, left + self.crop, top + self.crop))
        return pil

    def image(self, pil: Image.Image) -> torch.Tensor:
        """(3, H, W) float32 normalised tensor; grayscale becomes 3-channel RGB."""
        if pil.mode != "RGB":
            pil = _to_rgb(pil)
        pil = self._geometry(pil, IMAGE_FILTERS[self.resample])
        x = torch.from_numpy(np.asarray(pil, dtype=np.float32).copy()).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1) * 255.0
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1) * 255.0
        return (x - mean) / std

    def mask(self, pil: Image.Image) -> torch.Tensor:
        """(1, H, W) float {0, 1} tensor: nearest resize, same crop as :meth:`image`."""
        if pil.mode != "L":
            arr = np.asarray(pil)
            arr = arr.any(axis=-1) if arr.ndim == 3 else arr > 0
            pil = Image.fromarray(arr.astype(np.uint8) * 255)
        pil = self._geometry(pil, MASK_FILTERS[self.mask_resample])
        cut = 0 if self.mask_resample == "nearest" else 127  # bilinear: > 0.5 of 255
        return torch.from_numpy((np.asarray(pil) > cut).astype(np.float32))[None]


# ---------------------------------------------------------------------- dataset
class RecordDataset(Dataset):
    """Preprocessed items of a list of :class:`SampleRecord`.

    Each item is a dict with ``image`` (3, H, W), ``label``, ``path``, ``defect_type``,
    ``rotation`` and, when ``with_masks``, ``mask`` (1, H, W) (zeros for normal images
    without a mask file).
    """

    def __init__(
        self,
        records: Sequence[SampleRecord],
        preprocess: Preprocess,
        with_masks: bool = True,
        transform_pil: TransformPil | None = None,
    ) -> None:
        self.records = list(records)
        self.preprocess = preprocess
        self.with_masks = with_masks
        self.transform_pil = transform_pil

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The preprocessed item, kept in the process memo (:mod:`anomaly_bench.memo`) under
        the files' stamps, the preprocessing and the transform's decision for the record, so
        the jobs of a sweep in one process decode each image once. A kept item also holds
        its image's content key (``key``), which :func:`collate` attaches to the batch so
        that the feature cache of every later job finds its entries without hashing."""
        rec = self.records[index]
        key = self._memo_key(rec)
        if key is None:
            return self._load(rec)
        return MEMO.get_or_compute(key, lambda: self._keyed(self._load(rec)))

    @staticmethod
    def _keyed(item: dict[str, Any]) -> dict[str, Any]:
        if MEMO.budget > 0:  # only a kept item serves later jobs
            item["key"] = content_key(item["image"])
        return item

    def _memo_key(self, rec: SampleRecord) -> tuple | None:
        decide = getattr(self.transform_pil, "key", None)
        if self.transform_pil is not None and decide is None:
            return None  # a transform that cannot name its effect: never memoised
        try:
            return ("sample", file_stamp(rec.image_path),
                    file_stamp(rec.mask_path) if self.with_masks else None, rec.label,
                    rec.defect_type, rec.category, self.preprocess, self.with_masks,
                    decide(rec) if decide is not None else None)
        except OSError:
            return None  # missing file: loading reports it

    def _load(self, rec: SampleRecord) -> dict[str, Any]:
        image = read_image(rec.image_path)
        mask = None
        if self.with_masks:
            if rec.mask_path is not None:
                mask = read_mask(rec.mask_path, image.size, rec.image_path)
            elif rec.label == ANOMALOUS:
                raise DataError(
                    f"The anomalous test image {rec.image_path} has no mask although the "
                    f"dataset has pixel masks: add its mask to the ground-truth folder."
                )
        rotation = 0
        if self.transform_pil is not None:
            out = self.transform_pil(image, mask, rec)
            image, mask = out[0], out[1]
            rotation = int(out[2]) if len(out) > 2 else 0
        x = self.preprocess.image(image)
        item: dict[str, Any] = {
            "image": x, "label": int(rec.label), "path": str(rec.image_path),
            "defect_type": rec.defect_type, "rotation": rotation, "category": rec.category,
        }
        if self.with_masks:
            item["mask"] = (self.preprocess.mask(mask) if mask is not None
                            else torch.zeros((1, *x.shape[1:]), dtype=torch.float32))
        return item


def collate(items: Sequence[dict[str, Any]]) -> Batch:
    """Stack dataset items into a :class:`Batch` (masks only when every item has one)."""
    shapes = {tuple(it["image"].shape) for it in items}
    if len(shapes) > 1:
        a, b = items[0], next(it for it in items if it["image"].shape != items[0]["image"].shape)
        raise DataError(
            f"Images of different sizes in one batch: {a['path']} gives "
            f"{tuple(a['image'].shape[1:])} but {b['path']} gives {tuple(b['image'].shape[1:])}. "
            f"Set resolution.size (or resolution.crop) so that all images share one size."
        )
    has_masks = all("mask" in it for it in items)
    images = torch.stack([it["image"] for it in items])
    if all("key" in it for it in items):
        attach_row_keys(images, [it["key"] for it in items])
    return Batch(
        images=images,
        labels=torch.tensor([it["label"] for it in items], dtype=torch.long),
        paths=[it["path"] for it in items],
        defect_types=[it["defect_type"] for it in items],
        masks=torch.stack([it["mask"] for it in items]) if has_masks else None,
        rotations=torch.tensor([it.get("rotation", 0) for it in items], dtype=torch.long),
        categories=[it.get("category", "") for it in items],
    )


def _worker_message(exc: BaseException) -> str:
    """The original message of an error re-raised from a DataLoader worker."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    marker = f"{type(exc).__name__}: "
    cut = text.rfind(marker)
    return text[cut + len(marker):].strip() if cut >= 0 else text


class _Loader(DataLoader):
    """A DataLoader whose user-facing errors keep their one-paragraph message with workers.

    Workers are shut down as soon as iteration stops (error, exhaustion or an early
    ``break``), not whenever the garbage collector reaches the iterator.
    """

    def __iter__(self):  # type: ignore[override]
        it = super().__iter__()
        error: AnomalyBenchError | None = None
        try:
            while True:
                try:
                    batch = next(it)
                except StopIteration:
                    return
                except AnomalyBenchError as exc:
                    error = type(exc)(_worker_message(exc))
                    break
                yield batch
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if callable(shutdown):
                shutdown()
            del it
        raise error from None


def make_loader(
    records: list[SampleRecord],
    preprocess: Preprocess,
    batch_size: int,
    num_workers: int = 0,
    with_masks: bool = True,
    transform_pil: TransformPil | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """An ordered (unshuffled) loader of :class:`Batch` over ``records``. ``pin_memory``
    (for a CUDA device): batches in page-locked memory, copied to the device
    asynchronously (``Batch.to`` uses ``non_blocking``)."""
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1.")
    if int(num_workers) < 0:
        raise ConfigError(f"num_workers={num_workers} must be 0 or more.")
    dataset = RecordDataset(records, preprocess, with_masks, transform_pil)
    return _Loader(
        dataset, batch_size=int(batch_size), shuffle=False, num_workers=int(num_workers),
        collate_fn=collate, drop_last=False, pin_memory=bool(pin_memory),
    )


def denormalize(images: torch.Tensor, preprocess: Preprocess) -> np.ndarray:
    """(N, H, W, 3) uint8 images from normalised (N, 3, H, W) tensors, for plots."""
    x = images.detach().float().cpu()
    mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1)
    x = (x * std + mean).clamp(0, 1) * 255.0
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
