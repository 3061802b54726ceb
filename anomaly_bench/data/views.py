"""Random views of training images, drawn when an image is read (a method's train-time input).

A trained method may see its training images through other geometry than its test
images: MMR's official code trains on a random resized crop with a horizontal flip of
the image as read, and tests on the 256 resize with a 224 centre crop. A view is that
train-time geometry: the method declares it (``train_view``), the runner hands it to the
training source, and each epoch draws ``n_draws`` uniform numbers per image from the
epoch's seeded generator (:meth:`~anomaly_bench.data.source.TrainSource.epoch`), so a
resumed training sees the same views. The view turns the native-size image into the
final ``size`` x ``size`` one; normalisation follows as for every image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from anomaly_bench.data.loading import IMAGE_FILTERS
from anomaly_bench.types import SampleRecord


class TrainView(Protocol):
    """A random geometry applied to a training image as read (see the module docstring)."""

    size: int
    n_draws: int

    def apply(self, image: Image.Image, draws: Sequence[float]) -> Image.Image:
        """The ``size`` x ``size`` view of ``image`` chosen by ``n_draws`` uniforms in [0, 1)."""
        ...


@dataclass(frozen=True)
class RandomResizedCrop:
    """torchvision's ``RandomResizedCrop(size, scale, ratio)`` then an optional horizontal
    flip with probability 1/2, with its draws given: up to ``attempts`` tries of a box of
    area fraction in ``scale`` and aspect ratio log-uniform in ``ratio`` that fits the
    image (else the central crop of the nearest allowed ratio), resized with ``resample``
    (PIL's filter, anti-aliased when shrinking)."""

    size: int | None  # None: set by the runner to the test images' size
    scale: tuple[float, float]
    ratio: tuple[float, float]
    resample: str = "bicubic"
    flip: bool = True
    attempts: int = 10

    @property
    def n_draws(self) -> int:
        return 4 * self.attempts + 1

    def box(self, width: int, height: int, draws: Sequence[float]) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop, as torchvision's ``get_params``."""
        area = width * height
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for a in range(self.attempts):
            u_area, u_ratio, u_top, u_left = draws[4 * a: 4 * a + 4]
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u_area)
            aspect = math.exp(lo + (hi - lo) * u_ratio)
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            h, w = height, round(height * max(self.ratio))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def apply(self, image: Image.Image, draws: Sequence[float]) -> Image.Image:
        top, left, h, w = self.box(image.size[0], image.size[1], draws)
        out = image.crop((left, top, left + w, top + h)).resize(
            (self.size, self.size), IMAGE_FILTERS[self.resample])
        if self.flip and draws[-1] < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return out


@dataclass(frozen=True)
class DrawnViews:
    """The loader's image transform for one epoch: each record's view with its draws.

    ``before`` (the alignment's transform, if any) runs first on the image and mask."""

    view: TrainView
    draws: Mapping[SampleRecord, Sequence[float]]
    before: object = None

    def __call__(self, image: Image.Image, mask: Image.Image | None, rec: SampleRecord):
        k = 0
        if callable(self.before):
            out = self.before(image, mask, rec)
            image, mask = out[0], out[1]
            k = int(out[2]) if len(out) > 2 else 0
        return self.view.apply(image, self.draws[rec]), None, k
