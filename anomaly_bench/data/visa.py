"""VisA (Zou et al., 2022) in its published layout, split by the official ``1cls.csv``.

::

    <root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG
    <root>/<category>/Data/Masks/Anomaly/*.png          (non-zero = defect)
    <root>/split_csv/1cls.csv                            object,split,label,image,mask

The one-class split file says which images train and which test, with paths relative to
``<root>``; categories are the file's ``object`` values that have a folder.
"""

from __future__ import annotations

import csv
from functools import cache
from pathlib import Path

from anomaly_bench.errors import DataError
from anomaly_bench.paths import check_name
from anomaly_bench.types import ANOMALOUS, NORMAL, CategorySplit, SampleRecord

from . import meta
from .layout_utils import names
from .registry import register_layout

SPLIT_FILE = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")


@cache
def _read_split(path: Path, stamp: tuple[int, int]) -> tuple[dict[str, str], ...]:
    """Rows of a split file (cached per file size and modification time)."""
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path} lacks the columns {', '.join(missing)}: expected the "
                                f"official VisA split file with columns {', '.join(COLUMNS)}.")
            return tuple(dict(r) for r in reader)
    except OSError as exc:
        raise DataError(f"Cannot read the VisA split file {path}: {exc}.") from None


@register_layout
class VisaLayout(meta.Indexed):
    """VisA's 12 categories, train/test by the official one-class split."""

    name = "visa"
    title = "VisA"
    expected = ("<root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG, "
                "<root>/<category>/Data/Masks/Anomaly/*.png and <root>/split_csv/1cls.csv.")

    def _rows(self, root: Path) -> tuple[dict[str, str], ...]:
        path = Path(root) / SPLIT_FILE
        if not path.is_file():
            return ()
        st = path.stat()
        return _read_split(path, (st.st_size, st.st_mtime_ns))

    def read_categories(self, root: Path) -> list[str]:
        """The split file's categories that have a folder."""
        found = {r["object"] for r in self._rows(root)}
        return sorted(c for c in found if (Path(root) / c / "Data").is_dir())

    def read_split(self, root: Path, category: str) -> CategorySplit:
        """Records of ``category`` by the official split file."""
        root = Path(root)
        check_name(category, "dataset.category")
        rows = [r for r in self._rows(root) if r["object"] == category]
        if not rows:
            raise DataError(
                f"VisA category '{category}' is not in {root / SPLIT_FILE} (categories found: "
                f"{names(self.categories(root))}). Expected layout: {self.expected}")
        train: list[SampleRecord] = []
        test: list[SampleRecord] = []
        for r in rows:
            image = root / r["image"]
            if not image.is_file():
                raise DataError(f"{root / SPLIT_FILE} lists {r['image']}, but {image} does not "
                                "exist (an incomplete download?).")
            anomalous = r["label"].strip().lower() == "anomaly"
            if r["split"] == "train":
                if anomalous:
                    raise DataError(f"{root / SPLIT_FILE} lists the anomalous image "
                                    f"{r['image']} for training: not a one-class split.")
                train.append(SampleRecord(image, NORMAL, "good"))
            elif r["split"] == "test":
                mask = root / r["mask"] if anomalous and r["mask"].strip() else None
                if anomalous and (mask is None or not mask.is_file()):
                    raise DataError(f"Missing mask of the anomalous test image {image}: "
                                    f"expected {mask or 'a mask path in the split file'}.")
                test.append(SampleRecord(image, ANOMALOUS if anomalous else NORMAL,
                                         "anomaly" if anomalous else "good", mask))
            else:
                raise DataError(f"{root / SPLIT_FILE}: split={r['split']!r} for {r['image']}; "
                                "expected train or test.")
        if not train or not test:
            raise DataError(f"VisA category '{category}' has {len(train)} training and "
                            f"{len(test)} test images in {root / SPLIT_FILE}; both are needed.")
        return CategorySplit(dataset=self.name, category=category, root=root, train=train,
                             test=test, has_masks=True)
