"""AeBAD (Zhang et al., 2023): aero-engine blades. AeBAD-S: single blades tested under four
domain shifts; AeBAD-V: frames of three videos, labelled per frame (:class:`AeBADVLayout`).

As published, one category ``AeBAD_S``::

    AeBAD_S/train/good/<sub-folder>/*.png
    AeBAD_S/test/<type>/<same|background|illumination|view>/*.png     (type: good or a defect)
    AeBAD_S/ground_truth/<type>/<domain>/<same file name>.png

The test images of all four domains form the category's test set; each image carries its
domain as ``subset``, and the layout declares the domains as test subsets, so a run
reports the category as a whole and one row per domain (``AeBAD_S/same``, ...), as the
MMR paper's table does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anomaly_bench.errors import DataError
from anomaly_bench.paths import check_name
from anomaly_bench.types import ANOMALOUS, NORMAL, CategorySplit, SampleRecord

from .layout_utils import MaskIndex, list_images, list_subdirs, names
from .registry import register_layout

CATEGORY = "AeBAD_S"
DOMAINS = ("same", "background", "illumination", "view")



def _training(layout: Any, root: Path, category: str,
              wanted: str) -> tuple[Path, Path, list[SampleRecord]]:
    """The category folder, its ``train/good`` folder and the normal images of its
    sub-folders (AeBAD's layouts keep training images in one folder per capture)."""
    folder = Path(root) / check_name(category, "dataset.category")
    good = folder / "train" / "good"
    if category != wanted or not good.is_dir():
        raise DataError(f"{layout.title} category '{category}' not found under {root}: "
                        f"expected {Path(root) / wanted / 'train' / 'good'}. "
                        f"Expected layout: {layout.expected}")
    train = [SampleRecord(p, NORMAL, "good")
             for sub in list_subdirs(good, "training sub-folders")
             for p in list_images(good / sub, "training images")]
    return folder, good, train

@register_layout
class AeBADSLayout:
    """The AeBAD-S tree; the four domain-shift folders become named test subsets."""

    name = "aebad_s"
    title = "AeBAD-S"
    expected = (
        f"<root>/{CATEGORY}/train/good/<sub-folder>/*.png, "
        f"<root>/{CATEGORY}/test/<type>/<{'|'.join(DOMAINS)}>/*.png and "
        f"<root>/{CATEGORY}/ground_truth/<type>/<domain>/<same name>.png."
    )

    def categories(self, root: Path) -> list[str]:
        return [CATEGORY] if (Path(root) / CATEGORY / "train" / "good").is_dir() else []

    def split(self, root: Path, category: str) -> CategorySplit:
        folder, good, train = _training(self, root, category, CATEGORY)
        train += [SampleRecord(p, NORMAL, "good") for p in list_images(good, "training images")]
        if not train:
            raise DataError(f"No training images under {good}: expected "
                            f"{good}/<sub-folder>/*.png.")
        test: list[SampleRecord] = []
        for kind in list_subdirs(folder / "test", "test folders"):
            for domain in list_subdirs(folder / "test" / kind, "domain folders"):
                if domain not in DOMAINS:
                    raise DataError(
                        f"{folder / 'test' / kind / domain} is not an {self.title} domain "
                        f"folder: expected {names(DOMAINS)}.")
                images = list_images(folder / "test" / kind / domain, "test images")
                if kind == "good":
                    test += [SampleRecord(p, NORMAL, "good", subset=domain) for p in images]
                    continue
                masks = MaskIndex(folder / "ground_truth" / kind / domain, ("",))
                test += [SampleRecord(p, ANOMALOUS, kind, masks.require(p), subset=domain)
                         for p in images]
        if not test:
            raise DataError(f"No test images under {folder / 'test'}. Expected layout: "
                            f"{self.expected}")
        present = tuple(d for d in DOMAINS if any(r.subset == d for r in test))
        return CategorySplit(dataset=self.name, category=category, root=Path(root),
                             train=train, test=test, has_masks=True, subsets=present)


V_CATEGORY = "AeBAD_V"
VIDEOS = ("video1", "video2", "video3")


@register_layout
class AeBADVLayout:
    """AeBAD-V: frames of three test videos, labelled per frame only.

    As published, one category ``AeBAD_V``::

        AeBAD_V/train/good/<sub-folder>/*.jpg
        AeBAD_V/test/<video1|video2|video3>/<good|anomaly type>/*.jpg

    Each video is a named test subset (a row per video besides the whole). There are no
    pixel masks, so pixel AUROC and the PROs are undefined (empty in results.csv).
    """

    name = "aebad_v"
    title = "AeBAD-V"
    expected = (
        f"<root>/{V_CATEGORY}/train/good/<sub-folder>/*.jpg and "
        f"<root>/{V_CATEGORY}/test/<{'|'.join(VIDEOS)}>/<good|anomaly type>/*.jpg."
    )

    def categories(self, root: Path) -> list[str]:
        return [V_CATEGORY] if (Path(root) / V_CATEGORY / "train" / "good").is_dir() else []

    def split(self, root: Path, category: str) -> CategorySplit:
        folder, good, train = _training(self, root, category, V_CATEGORY)
        if not train:
            raise DataError(f"No training frames under {good}: expected "
                            f"{good}/<sub-folder>/*.jpg.")
        test: list[SampleRecord] = []
        for video in list_subdirs(folder / "test", "video folders"):
            if video not in VIDEOS:
                raise DataError(f"{folder / 'test' / video} is not an {self.title} video "
                                f"folder: expected {names(VIDEOS)}.")
            for kind in list_subdirs(folder / "test" / video, "label folders"):
                label = NORMAL if kind == "good" else ANOMALOUS
                test += [SampleRecord(p, label, kind, subset=video)
                         for p in list_images(folder / "test" / video / kind, "test frames")]
        if not test:
            raise DataError(f"No test frames under {folder / 'test'}. Expected layout: "
                            f"{self.expected}")
        present = tuple(v for v in VIDEOS if any(r.subset == v for r in test))
        return CategorySplit(dataset=self.name, category=category, root=Path(root),
                             train=train, test=test, has_masks=False, subsets=present)
