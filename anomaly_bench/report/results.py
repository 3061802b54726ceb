"""results.csv: one row per category, written atomically so nothing computed is lost.

A row and the record it stands for are one unit: ``record_sha256`` (the last column) is
the SHA-256 of the category's resolved configuration (``<category>/config.json``) and its
per-image scores (``<category>/scores.csv``), see :func:`record_digest`. Those files are
written first and the row last, so whatever write fails in between, a row whose files do
not hash to its digest is never taken as finished. Rows written before the column existed
have it empty; their ``config.json`` alone is compared.

Every reader (resume, ``anomaly-bench-report``) goes through :func:`read_rows`, which
checks each line against the header (number of fields, the type of every known cell, a
category) and stops at the first damaged or foreign line with one paragraph naming the
file and the line. The writer (:func:`write_rows`) keeps every valid row and moves
damaged lines to ``results.csv.damaged`` beside the file, so nothing is dropped.

Text cells are neutralised against spreadsheet formulas in every CSV the project writes
(:func:`to_cell`) and read back to the same value (:func:`from_cell`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from anomaly_bench.errors import DataError
from anomaly_bench.fsutil import atomic_open, open_nofollow
from anomaly_bench.metrics import METRIC_NAMES

log = logging.getLogger("anomaly_bench")

COLUMNS: tuple[str, ...] = (
    "method", "backbone", "weights", "dataset", "category", "layers", "resolution",
    "alignment", "seed", "image_auroc", "pixel_auroc", "aupro", "image_f1_max", "n_train",
    "n_test", "train_s", "test_s", "ms_per_image", "peak_mem_mb", "device", "overrides",
    "image_ap", "pixel_ap", "pixel_f1_max", "aupro_200", "aupro_200_per_image",
    "record_sha256",
)
#: The columns every version of results.csv starts with, never moved (later versions added
#: the other metrics and ``record_sha256``; a file without them is read with them empty).
BASE_COLUMNS = COLUMNS[: COLUMNS.index("overrides") + 1]
#: The cell every row must fill: what resume and the reports key rows by.
REQUIRED = ("category",)
_PRECISION = {
    **dict.fromkeys(METRIC_NAMES, 6),
    "train_s": 3, "test_s": 3, "ms_per_image": 2, "peak_mem_mb": 1,
}
_INTEGERS = ("seed", "n_train", "n_test")
_COSTS = ("train_s", "test_s", "ms_per_image", "peak_mem_mb")
_SHA256 = re.compile(r"[0-9a-f]{64}")

# ---------------------------------------------------------------------- cells
#: A cell starting with one of these is read as a formula by spreadsheets (OWASP).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def to_cell(text: str) -> str:
    """``text`` made safe to open in a spreadsheet, reversibly (OWASP's CSV-injection advice).

    A cell that begins with ``=``, ``+``, ``-``, ``@``, tab or carriage return and is not
    a plain number gets a leading apostrophe, which spreadsheets show as text; so does a
    cell that already begins with an apostrophe, which makes :func:`from_cell` exact.
    """
    if text.startswith("'") or (text.startswith(_FORMULA_START) and not _NUMBER.fullmatch(text)):
        return "'" + text
    return text


def from_cell(text: str) -> str:
    """The value :func:`to_cell` was given."""
    return text[1:] if text.startswith("'") else text


def format_value(key: str, value: object) -> str:
    """CSV text of a value: empty for None, fixed decimals for metrics and costs, text
    through :func:`to_cell`."""
    if value is None:
        return ""
    if isinstance(value, float):
        digits = _PRECISION.get(key)
        return f"{value:.{digits}f}" if digits is not None else repr(value)
    if isinstance(value, str):
        return to_cell(value)
    return str(value)


def record_digest(config: Mapping[str, object], scores: bytes) -> str:
    """``record_sha256`` of a row: the SHA-256 of its configuration (canonical JSON, as
    ``config.json`` parses back) and the bytes of its ``scores.csv``."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":"))
                            .encode())
    digest.update(b"\0")
    digest.update(scores)
    return digest.hexdigest()


# ---------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Damage:
    """A line of a results file that is not a row: where, its text, and why."""

    line: int
    text: str
    reason: str


def _bad_cell(column: str, value: str) -> str | None:
    """Why ``value`` cannot be the ``column`` cell of a row (None when it can)."""
    if value == "":
        return f"no {column}" if column in REQUIRED else None
    try:
        if column in METRIC_NAMES:
            x = float(value)
            return None if 0.0 <= x <= 1.0 else f"{column}={value} is not in [0, 1]"
        if column in _INTEGERS:
            int(value)
            return None
        if column in _COSTS:
            x = float(value)
            return None if math.isfinite(x) and x >= 0 else f"{column}={value} is negative"
    except ValueError:
        return f"{column}={value!r} is not a number"
    if column == "record_sha256" and not _SHA256.fullmatch(value):
        return f"record_sha256={value!r} is not a SHA-256"
    return None


def _bad_header(header: list[str]) -> str | None:
    if header[: len(BASE_COLUMNS)] != list(BASE_COLUMNS):
        return "its header is not the one of results.csv (" + ", ".join(BASE_COLUMNS[:3]) \
            + ", ... first)"
    if "" in header or len(set(header)) != len(header):
        return "its header has an empty or repeated column name"
    return None


def parse(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]], list[Damage]]:
    """(header, valid rows with their line, damaged lines) of a results file (all empty
    when it is absent).

    A row is valid when it has one field per header column, every known cell has its type
    (metrics in [0, 1], counts integer, costs >= 0, a digest of 64 hex digits) and its
    category is set. A file whose header is not results.csv's is one damaged record. A
    file that is a symbolic link is refused (DataError).
    """
    if path.is_symlink():
        raise DataError(
            f"{path} is a symbolic link; a results file is never read or written through a "
            "link: put the file itself there, or run into a new directory."
        )
    if not path.is_file():
        return [], [], []
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    lines = text.splitlines(keepends=True)
    reader = csv.reader(iter(lines), strict=True)
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, str]]] = []
    damaged: list[Damage] = []
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            damaged.append(Damage(start, "".join(lines[start - 1 : reader.line_num]),
                                  f"not CSV: {exc}"))
            continue
        raw = "".join(lines[start - 1 : reader.line_num])
        if not fields:
            continue  # an empty line holds nothing
        reason = "not UTF-8 text" if re.search("[\udc80-\udcff]", raw) else None
        if header is None:
            header = [from_cell(f) for f in fields]
            reason = reason or _bad_header(header)
            if reason:
                return [], [], [Damage(1, text, reason)]
            continue
        if reason is None and len(fields) != len(header):
            reason = f"{len(fields)} fields where the header has {len(header)}"
        row = dict(zip(header, (from_cell(f) for f in fields), strict=False))
        if reason is None:
            reason = next((r for r in (_bad_cell(k, v) for k, v in row.items()) if r), None)
        if reason is None:
            reason = next((f"no {k}" for k in REQUIRED if not row.get(k)), None)
        if reason is not None:
            damaged.append(Damage(start, raw, reason))
        else:
            rows.append((start, row))
    return header or [], rows, damaged


def _damage_error(path: Path, d: Damage) -> DataError:
    excerpt = d.text.strip()
    excerpt = excerpt if len(excerpt) <= 80 else excerpt[:77] + "..."
    return DataError(
        f"{path}, line {d.line}, is not a complete row of results.csv ({d.reason}): "
        f"{excerpt!r}. Only complete rows are read, so nothing was read or changed: fix or "
        f"delete that line, or run the job again with resume=false, which recomputes its "
        f"categories and moves the damaged lines to {path.name}.damaged."
    )


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a results file (results.csv, summary.csv) as dicts, text cells as written
    (empty list when it does not exist); DataError naming the first damaged line."""
    _, rows, damaged = parse(path)
    if damaged:
        raise _damage_error(path, damaged[0])
    return [row for _, row in rows]


def rows_by_category(path: Path) -> dict[str, dict[str, str]]:
    """The rows of a results.csv by category; DataError at a damaged line or a category
    that has two rows."""
    _, rows, damaged = parse(path)
    if damaged:
        raise _damage_error(path, damaged[0])
    out: dict[str, dict[str, str]] = {}
    seen: dict[str, int] = {}
    for line, row in rows:
        category = row["category"]
        if category in out:
            raise _damage_error(path, Damage(
                line, ",".join(row.values()),
                f"category {category} already has a row, on line {seen[category]}"))
        out[category], seen[category] = row, line
    return out


def completed_categories(path: Path) -> set[str]:
    """Categories that already have a row (a resumed run skips them)."""
    return set(rows_by_category(path))


# ---------------------------------------------------------------------- writing
def ordered_columns(rows: Iterable[Mapping[str, object]], first: Iterable[str] = COLUMNS
                    ) -> list[str]:
    """``first`` in order, then every other key seen in ``rows``, sorted."""
    head = list(first)
    extra = sorted({k for r in rows for k in r} - set(head))
    return head + extra


def write_csv(path: Path, rows: list[Mapping[str, object]], columns: list[str]) -> None:
    """Write ``rows`` to ``path`` atomically (:func:`~anomaly_bench.fsutil.atomic_open`),
    every cell through :func:`format_value`."""
    with atomic_open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([to_cell(c) for c in columns])
        for row in rows:
            writer.writerow([format_value(k, row.get(k)) for k in columns])


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (read-modify-write of a shared file).

    Several processes (joblib or SLURM jobs sharing a run directory) may add rows to one
    results.csv at once; without the lock two of them read the same old file and the
    second rename drops the first one's row. The lock file is never opened through a link.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_nofollow(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _set_aside(path: Path, damaged: list[Damage]) -> None:
    """Append damaged lines to ``<path>.damaged`` (their bytes as they were), and say so."""
    aside = path.with_name(f"{path.name}.damaged")
    old = aside.read_bytes() if aside.is_file() else b""
    new = "".join(d.text if d.text.endswith("\n") else d.text + "\n" for d in damaged)
    with atomic_open(aside, "wb") as fh:
        fh.write(old + new.encode("utf-8", "surrogateescape"))
    log.warning("%s: %d damaged line(s) moved to %s (%s); the valid rows are kept", path,
                len(damaged), aside,
                "; ".join(f"line {d.line}: {d.reason}" for d in damaged[:3]))


def write_rows(path: Path, rows: list[Mapping[str, object]]) -> None:
    """Insert or replace the rows of one category (its own and its subsets',
    ``<category>/<subset>``) in results.csv: one atomic rewrite under the lock.

    Every valid row of the file is kept; damaged lines are moved to ``<file>.damaged``.
    """
    names = {str(r.get("category")) for r in rows}

    def replaced(category: str) -> bool:
        return category in names or (category.split("/", 1)[0] in names and "/" in category)

    with locked(path):
        _, old, damaged = parse(path)
        if damaged:
            _set_aside(path, damaged)
        kept: list[Mapping[str, object]] = [r for _, r in old if not replaced(r["category"])]
        kept += [dict(r) for r in rows]
        write_csv(path, kept, ordered_columns(kept))


def write_row(path: Path, row: Mapping[str, object]) -> None:
    """Insert or replace (by ``category``) one row of results.csv, atomically and locked."""
    write_rows(path, [row])
