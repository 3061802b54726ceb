"""MVTec AD, and the MVTec-like tree reader that BTAD, MPDD, folder and synthetic reuse.

The tree of one category::

    <category>/train/<good>/*.png
    <category>/test/<good>/*.png
    <category>/test/<defect>/*.png
    <category>/ground_truth/<defect>/<stem><suffix>.png

Layouts differ only in the name of the normal folder (``good`` or ``ok``), in how a mask
is named after its image (``_mask`` suffix or the same stem), whether masks are required,
and which category names are expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from anomaly_bench.errors import DataError
from anomaly_bench.paths import check_name
from anomaly_bench.types import ANOMALOUS, NORMAL, CategorySplit, SampleRecord

from . import meta
from .layout_utils import (
    IMAGE_EXTENSIONS,
    MaskIndex,
    list_images,
    list_subdirs,
    names,
    unreadable_folder,
)
from .registry import register_layout


@dataclass(frozen=True)
class MVTecLikeLayout(meta.Indexed):
    """Reader of an MVTec-like tree, parameterised by its naming rules.

    ``good``: name of the normal-image folder in train/ and test/. ``mask_suffixes``: what
    follows the image stem in a mask's name, in order of preference (see
    :class:`~anomaly_bench.data.layout_utils.MaskIndex`). ``masks_required``: anomalous test
    images must have masks (else a missing ``ground_truth`` folder means "no masks").
    ``known_categories``: when set, only these folder names count as categories.
    """

    name: str
    title: str
    good: str = "good"
    mask_suffixes: tuple[str, ...] = ("_mask",)
    masks_required: bool = True
    known_categories: tuple[str, ...] | None = None

    # ------------------------------------------------------------------ descriptions
    @property
    def mask_rule(self) -> str:
        return " or ".join(f"<stem>{s}.<ext>" for s in self.mask_suffixes)

    @property
    def expected(self) -> str:
        """One sentence describing the layout, for error messages."""
        cats = (
            f" (categories: {', '.join(self.known_categories)})" if self.known_categories else ""
        )
        masks = "" if self.masks_required else " (optional)"
        return (
            f"<root>/<category>/train/{self.good}, <root>/<category>/test/{self.good}, "
            f"<root>/<category>/test/<defect> and <root>/<category>/ground_truth/<defect>/"
            f"{self.mask_rule}{masks}{cats}."
        )

    def category_hint(self, root: Path, category: str) -> str:
        """What the folder of a missing category should look like."""
        return f"expected a folder {root / category} with train/{self.good} and test/"

    # ------------------------------------------------------------------ layout protocol
    def is_category(self, folder: Path) -> bool:
        """True when ``folder`` holds a ``train/<good>`` folder."""
        return (folder / "train" / self.good).is_dir()

    def read_categories(self, root: Path) -> list[str]:
        """The category folders under ``root``."""
        root = Path(root)
        found = [d for d in list_subdirs(root, f"{self.title} category folders")
                 if self.is_category(root / d)]
        if self.known_categories is not None:
            found = [d for d in found if d in self.known_categories]
        return found

    def category_dir(self, root: Path, category: str) -> Path:
        """The folder of ``category`` under ``root`` (validated by :meth:`split`)."""
        return Path(root) / category

    def read_split(self, root: Path, category: str) -> CategorySplit:
        """Records of ``category`` read from its tree (what ``meta.json`` is written from)."""
        root = Path(root)
        folder = self.category_dir(root, check_name(category, "dataset.category"))
        if not folder.is_dir():
            raise DataError(
                f"{self.title} category '{category}' not found under {root}: "
                f"{self.category_hint(root, category)} "
                f"(categories found: {names(self.categories(root))})."
            )
        try:
            train, test, has_masks = read_category_tree(
                folder, self.title, self.good, self.mask_suffixes, self.masks_required
            )
        except OSError as exc:  # a folder of the tree that cannot be inspected
            raise unreadable_folder(folder, f"the {self.title} category tree", exc) from None
        return CategorySplit(
            dataset=self.name, category=category, root=root, train=train, test=test,
            has_masks=has_masks,
        )


def _extensions() -> str:
    return "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def read_category_tree(
    folder: Path,
    title: str,
    good: str = "good",
    mask_suffixes: tuple[str, ...] = ("_mask",),
    masks_required: bool = True,
) -> tuple[list[SampleRecord], list[SampleRecord], bool]:
    """Train records, test records and ``has_masks`` of one MVTec-like category folder.

    Raises DataError for a missing or empty ``train/<good>``, a missing or empty ``test``,
    and a missing mask of an anomalous test image (naming the expected file).
    """
    train_dir = folder / "train" / good
    if not train_dir.is_dir():
        if (folder / "train").is_dir():
            detail = f"train/ holds: {names(list_subdirs(folder / 'train'))}"
        else:
            detail = f"found: {names(list_subdirs(folder))}"
        raise DataError(
            f"{folder} is not a {title} category folder: expected {train_dir} with the "
            f"normal training images, and test/ ({detail})."
        )
    train = [SampleRecord(p, NORMAL, good)
             for p in list_images(train_dir, "the normal training images")]
    if not train:
        raise DataError(
            f"No training images in {train_dir}: expected the normal training images there "
            f"as {_extensions()} files."
        )
    test_dir = folder / "test"
    defects = list_subdirs(test_dir, f"the test folders {good} and <defect>")
    if not defects:
        raise DataError(
            f"No test folders in {folder}: expected {test_dir}/{good} and "
            f"{test_dir}/<defect> folders with the test images."
        )
    gt_dir = folder / "ground_truth"
    has_masks = gt_dir.is_dir()
    test: list[SampleRecord] = []
    for defect in defects:
        images = list_images(test_dir / defect, "test images")
        if defect == good:
            test += [SampleRecord(p, NORMAL, good) for p in images]
            continue
        if not images:
            continue
        if not has_masks:
            if masks_required:
                rule = " or ".join(f"<stem>{s}.png" for s in mask_suffixes)
                raise DataError(
                    f"Missing masks for the {title} category {folder}: expected a folder "
                    f"{gt_dir / defect} holding a mask for each image of {test_dir / defect} "
                    f"(named {rule})."
                )
            test += [SampleRecord(p, ANOMALOUS, defect) for p in images]
            continue
        index = MaskIndex(gt_dir / defect, mask_suffixes)
        test += [SampleRecord(p, ANOMALOUS, defect, index.require(p)) for p in images]
    if not test:
        raise DataError(
            f"No test images in {test_dir}: expected {_extensions()} files in "
            f"{test_dir}/{good} and {test_dir}/<defect> (folders found: {names(defects)})."
        )
    return train, test, has_masks


MVTEC = register_layout(MVTecLikeLayout(name="mvtec", title="MVTec AD"))
