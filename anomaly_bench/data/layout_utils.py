"""Helpers shared by the dataset layouts: listing image files and pairing masks with images.

Listings are sorted by name. A folder that exists but cannot be read is a DataError naming
it; dangling or looping symlinks with an image name are skipped with one warning per folder.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from anomaly_bench.errors import DataError

log = logging.getLogger("anomaly_bench")

#: File extensions read as images (compared case-insensitively).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def has_image_name(path: Path) -> bool:
    """True for a visible name with an image extension (``._x.png`` etc. are not)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def is_image_file(path: Path) -> bool:
    """True for a visible regular file (or a symlink to one) with an image extension."""
    return has_image_name(path) and path.is_file()


def is_broken_symlink(path: Path) -> bool:
    """True for a symlink whose target is missing or which loops back on itself."""
    return path.is_symlink() and not path.exists()


def unreadable_folder(folder: Path, what: str, exc: OSError) -> DataError:
    """The DataError for a folder that exists but cannot be listed or inspected."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(folder) else ""
    return DataError(
        f"Cannot read the folder {folder}: {reason}{where}. Expected a readable folder holding "
        f"{what}; check its permissions (or the mount it lives on)."
    )


def _entries(folder: Path, keep: Callable[[Path], bool], what: str) -> list[Path]:
    """Entries of ``folder`` for which ``keep(path)`` holds, sorted by name; [] when it is not
    a folder; DataError (naming it and ``what``) when it cannot be listed or inspected."""
    try:
        if not folder.is_dir():
            return []
        return sorted((p for p in folder.iterdir() if keep(p)), key=lambda p: p.name)
    except OSError as exc:
        raise unreadable_folder(folder, what, exc) from None


def _warn_broken(folder: Path, broken: Sequence[Path]) -> None:
    if broken:
        n = len(broken)
        log.warning(
            "%s: %d dangling or looping symlink%s skipped (e.g. %s)",
            folder, n, "" if n == 1 else "s", broken[0],
        )


def list_images(folder: Path, what: str = "image files") -> list[Path]:
    """Image files directly inside ``folder``, sorted by name; [] when it does not exist.

    Symlinks to image files count as images; dangling or looping ones are skipped with a
    warning giving their count. ``what`` describes the expected content for the DataError
    raised when the folder cannot be read.
    """
    named = _entries(folder, has_image_name, what)
    try:
        images = [p for p in named if p.is_file()]
        broken = [p for p in named if not p.is_file() and is_broken_symlink(p)]
    except OSError as exc:
        raise unreadable_folder(folder, what, exc) from None
    _warn_broken(folder, broken)
    return images


def list_files(folder: Path, pattern: str, what: str) -> list[Path]:
    """Regular files (or symlinks to one) in ``folder`` whose name matches the shell pattern
    ``pattern`` (case-sensitive), sorted by name; [] when it does not exist."""
    return _entries(
        folder, lambda p: fnmatch.fnmatchcase(p.name, pattern) and p.is_file(), what
    )


def list_subdirs(folder: Path, what: str = "sub-folders") -> list[str]:
    """Names of the visible sub-folders of ``folder``, sorted; [] when it does not exist."""
    found = _entries(folder, lambda p: not p.name.startswith(".") and p.is_dir(), what)
    return [p.name for p in found]


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
        # sorted, so the first extension in name order wins
        for p in list_images(folder, "mask files"):
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
