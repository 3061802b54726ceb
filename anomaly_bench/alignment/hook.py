"""The data-loader hook that applies per-image rotations decided by an aligner."""

from __future__ import annotations

from collections.abc import Mapping

from PIL import Image

from anomaly_bench.types import SampleRecord


class RotationHook:
    """Rotate each image and its mask by its quarter turns ``rotations[str(path)]``.

    The turns are reported back (``Batch.rotations``) so maps can be shown in the image's
    original orientation. A class rather than a closure so loader workers can pickle it.
    """

    def __init__(self, rotations: Mapping[str, int]) -> None:
        self.rotations = dict(rotations)

    def key(self, record: SampleRecord) -> int:
        """The quarter turns applied to ``record`` (what distinguishes its output)."""
        return int(self.rotations.get(str(record.image_path), 0)) % 4

    def __call__(self, image: Image.Image, mask: Image.Image | None,
                 record: SampleRecord) -> tuple[Image.Image, Image.Image | None, int]:
        from anomaly_bench.alignment.orb import rotate_pil

        k = self.key(record)
        if k == 0:
            return image, mask, 0
        return rotate_pil(image, k), (None if mask is None else rotate_pil(mask, k)), k


def rotation_hook(rotations: Mapping[str, int]) -> RotationHook:
    """The loader hook for ``rotations`` (path -> quarter turns counter-clockwise)."""
    return RotationHook(rotations)
