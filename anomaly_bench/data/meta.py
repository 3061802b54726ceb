"""The ``meta.json`` index the APRIL-GAN and WinCLIP repositories build for MVTec AD and VisA.

Their ``data/mvtec.py`` and ``data/visa.py`` write, at the dataset root::

    {"train": {<category>: [<entry>, ...], ...},
     "test":  {<category>: [<entry>, ...], ...}}
    <entry> = {"img_path": "bottle/test/broken_large/000.png",
               "mask_path": "bottle/ground_truth/broken_large/000_mask.png",  ("" if normal)
               "cls_name": "bottle", "specie_name": "broken_large",            ("" for VisA)
               "anomaly": 1}

paths relative to the root, and their loaders read only that file. A root holding a
``meta.json`` is read through it here too (a user's edited or reduced index is honoured),
after checking every entry: paths relative and inside the root, files present, ``cls_name``
equal to its category, ``anomaly`` 0 or 1, no anomalous training image, a mask for every
anomalous test image. :func:`write` builds the same file from the dataset's own layout
(``anomaly-bench-data meta``), with each mask paired to its image by name (the official
MVTec writer pairs them by sorted position, which agrees on the published dataset).
"""

from __future__ import annotations

import json
import logging
from functools import cache
from pathlib import Path, PurePosixPath

from anomaly_bench.errors import DataError
from anomaly_bench.paths import check_name
from anomaly_bench.types import ANOMALOUS, NORMAL, CategorySplit, SampleRecord

from .layout_utils import names

log = logging.getLogger("anomaly_bench")

FILE = "meta.json"
PHASES = ("train", "test")
#: Layouts whose root may hold a meta.json, and whether its entries name the defect type
#: (MVTec AD's ``specie_name``; VisA's official writer leaves it empty).
SPECIES = {"mvtec": True, "visa": False}
EXPECTED = ('{"train": {<category>: [entries]}, "test": {<category>: [entries]}} with '
            'entries {"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}, as '
            "the APRIL-GAN repository's data/mvtec.py and data/visa.py write it")


def path_of(root: Path) -> Path:
    return Path(root) / FILE


@cache
def _read(path: Path, stamp: tuple[int, ...]) -> dict:
    """The parsed index (cached per file size, modification time and inode); its shape
    checked."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}): expected {EXPECTED}. Remove it "
                        "to read the folders, or rewrite it with anomaly-bench-data meta "
                        "DATASET --root ROOT --force.") from None
    ok = isinstance(data, dict) and all(
        isinstance(data.get(p), dict) and all(isinstance(v, list) for v in data[p].values())
        for p in PHASES)
    if not ok:
        raise DataError(f"{path} is not a dataset index: expected {EXPECTED}.")
    return data


def index(root: Path) -> dict | None:
    """The meta.json at ``root``, parsed, or None when there is none."""
    path = path_of(root)
    if not path.is_file():
        return None
    st = path.stat()
    return _read(path, (st.st_size, st.st_mtime_ns, st.st_ino))


def honoured(dataset: str, root: Path) -> dict | None:
    """The meta.json a ``dataset`` layout reads ``root`` through, or None (no file, or a
    layout the official repositories write no index for)."""
    return index(root) if dataset in SPECIES else None


def categories_of(data: dict) -> list[str]:
    """Categories listed for both phases, sorted."""
    return sorted(set(data["train"]) & set(data["test"]))


def _file(root: Path, path: Path, value: object, what: str) -> Path:
    """``value`` as a file under ``root``; DataError naming the entry otherwise."""
    rel = PurePosixPath(value) if isinstance(value, str) else None
    if rel is None or not value or rel.is_absolute() or ".." in rel.parts or "\\" in value:
        raise DataError(f"{path}: {what} is {value!r}; expected a path relative to {root} "
                        "without '..'.")
    file = Path(root, *rel.parts)
    if not file.is_file():
        raise DataError(f"{path}: {what} is {value!r}, but {file} does not exist (an "
                        "incomplete copy of the dataset, or an index written for another "
                        "root).")
    return file


def _record(root: Path, path: Path, phase: str, category: str, i: int, entry: object,
            species: bool) -> SampleRecord:
    where = f"{phase}/{category} entry {i}"
    if not isinstance(entry, dict):
        raise DataError(f"{path}: {where} is {type(entry).__name__}; expected an object "
                        "with img_path, mask_path, cls_name, specie_name and anomaly.")
    if entry.get("cls_name") != category:
        raise DataError(f"{path}: {where} has cls_name {entry.get('cls_name')!r}; expected "
                        f"{category!r}, the category it is listed under.")
    label = entry.get("anomaly")
    if label not in (0, 1) or isinstance(label, bool):
        raise DataError(f"{path}: {where} has anomaly {label!r}; expected 0 or 1.")
    if phase == "train" and label == 1:
        raise DataError(f"{path}: {where} is an anomalous training image "
                        f"({entry.get('img_path')!r}); a one-class split trains on normal "
                        "images only.")
    image = _file(root, path, entry.get("img_path"), f"{where} img_path")
    mask = None
    if label == 1 and phase == "test":
        mask = _file(root, path, entry.get("mask_path"), f"{where} mask_path (anomalous)")
    specie = entry.get("specie_name", "")
    if not isinstance(specie, str):
        raise DataError(f"{path}: {where} has specie_name {specie!r}; expected a string.")
    defect = (specie if species and specie else "anomaly") if label else "good"
    return SampleRecord(image, ANOMALOUS if label else NORMAL, defect, mask)


def split_of(dataset: str, root: Path, data: dict, category: str) -> CategorySplit:
    """``category`` of the index ``data`` (read from ``root``'s meta.json), every entry checked."""
    path = path_of(root)
    listed = categories_of(data)
    if category not in listed:
        raise DataError(
            f"Category '{category}' is not listed in {path} (it lists {names(listed)}). The "
            "dataset's loaders read that index instead of the folders: rewrite it with "
            f"anomaly-bench-data meta {root} --dataset {dataset}, or remove it.")
    phases = {p: [_record(root, path, p, category, i, e, SPECIES.get(dataset, True))
                  for i, e in enumerate(data[p][category])] for p in PHASES}
    if not phases["train"] or not phases["test"]:
        raise DataError(f"{path} lists {len(phases['train'])} training and "
                        f"{len(phases['test'])} test images for '{category}'; both are needed.")
    log.debug("%s: %s read through %s", dataset, category, path)
    return CategorySplit(dataset=dataset, category=category, root=Path(root),
                         train=phases["train"], test=phases["test"], has_masks=True)


class Indexed:
    """A layout the official repositories index with a meta.json: its categories and
    splits come from the root's index when there is one, else from ``read_categories``
    and ``read_split`` (the dataset's own files, what :func:`build` indexes)."""

    name: str

    def read_categories(self, root: Path) -> list[str]:
        raise NotImplementedError

    def read_split(self, root: Path, category: str) -> CategorySplit:
        raise NotImplementedError

    def categories(self, root: Path) -> list[str]:
        index = honoured(self.name, Path(root))
        return categories_of(index) if index is not None else self.read_categories(root)

    def split(self, root: Path, category: str) -> CategorySplit:
        """Records of ``category`` (a plain name, else ConfigError)."""
        root = Path(root)
        check_name(category, "dataset.category")
        index = honoured(self.name, root)
        if index is not None:
            return split_of(self.name, root, index, category)
        return self.read_split(root, category)


def _entry(root: Path, record: SampleRecord, category: str, species: bool) -> dict:
    def rel(p: Path | None) -> str:
        return Path(p).relative_to(root).as_posix() if p is not None else ""
    return {"img_path": rel(record.image_path), "mask_path": rel(record.mask_path),
            "cls_name": category,
            "specie_name": record.defect_type if species else "",
            "anomaly": int(record.label == ANOMALOUS)}


def build(dataset: str, splits: list[CategorySplit]) -> dict:
    """The index of ``splits`` (read from the folders), in the official file's form."""
    species = SPECIES[dataset]
    out: dict = {p: {} for p in PHASES}
    for s in splits:
        root = Path(s.root)
        out["train"][s.category] = [_entry(root, r, s.category, species) for r in s.train]
        out["test"][s.category] = [_entry(root, r, s.category, species) for r in s.test]
    return out


def text(data: dict) -> str:
    """The file's text as the official writers format it (4-space indent, final newline)."""
    return json.dumps(data, indent=4) + "\n"
