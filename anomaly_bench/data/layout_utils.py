"""Helpers shared by the dataset layouts: listing image files and pairing masks with images."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from anomaly_bench.errors import DataError

#: File extensions read as images (compared case-insensitively).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def is_image_file(path: Path) -> bool:
    """True for a visible regular file with an image extension (``._x.png`` etc. are skipped)."""
    return (
        path.suffix.lower() in IMAGE_EXTENSIONS
        and not path.name.startswith(".")
        and path.is_file()
    )


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name; [] when it does not exist."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def list_subdirs(folder: Path) -> list[str]:
    """Names of the visible sub-folders of ``folder``, sorted; [] when it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def names(items: Iterable[str], empty: str = "none") -> str:
    """``a, b, c`` for messages (``empty`` when there are none)."""
    items = list(items)
    return ", ".join(items) if items else empty


class MaskIndex:
    """The mask files of one folder, looked up by file stem (any image extension).

    ``suffixes`` are the accepted endings of a mask stem after the image stem, in order of
    preference: ``("_mask",)`` for MVTec AD (``000.png`` -> ``000_mask.png``), ``("", "_mask")``
    for layouts whose masks share the image's name.
    """

    def __init__(self, folder: Path, suffixes: Sequence[str]) -> None:
        self.folder = folder
        self.suffixes = tuple(suffixes)
        self._by_stem: dict[str, Path] = {}
        for p in list_images(folder):  # sorted, so the first extension in name order wins
            self._by_stem.setdefault(p.stem, p)

    def find(self, image: Path) -> Path | None:
        """The mask of ``image``, or None when the folder holds none for it."""
        for suffix in self.suffixes:
            hit = self._by_stem.get(image.stem + suffix)
            if hit is not None:
                return hit
        return None

    def expected(self, image: Path) -> str:
        """Describes the file(s) that would have been accepted as ``image``'s mask."""
        ext = ".png" if self.suffixes == ("_mask",) else image.suffix
        options = [str(self.folder / f"{image.stem}{s}{ext}") for s in self.suffixes]
        text = " or ".join(options)
        return text if self.suffixes == ("_mask",) else f"{text} (any image extension)"

    def require(self, image: Path) -> Path:
        """The mask of an anomalous ``image``; DataError naming the expected file if missing."""
        hit = self.find(image)
        if hit is None:
            raise DataError(
                f"Missing mask for the anomalous test image {image}: expected "
                f"{self.expected(image)}. Every image in test/<defect> needs a pixel mask in "
                f"the matching ground-truth folder."
            )
        return hit
