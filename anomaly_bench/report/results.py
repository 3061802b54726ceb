"""results.csv: one row per category, written atomically so nothing computed is lost."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from anomaly_bench.fsutil import atomic_open

COLUMNS: tuple[str, ...] = (
    "method", "backbone", "weights", "dataset", "category", "layers", "resolution",
    "alignment", "seed", "image_auroc", "pixel_auroc", "aupro", "image_f1_max", "n_train",
    "n_test", "train_s", "test_s", "ms_per_image", "peak_mem_mb", "device", "overrides",
)
_PRECISION = {
    "image_auroc": 6, "pixel_auroc": 6, "aupro": 6, "image_f1_max": 6,
    "train_s": 3, "test_s": 3, "ms_per_image": 2, "peak_mem_mb": 1,
}


def format_value(key: str, value: object) -> str:
    """CSV text of a value: empty for None, fixed decimals for metrics and costs."""
    if value is None:
        return ""
    if isinstance(value, float):
        digits = _PRECISION.get(key)
        return f"{value:.{digits}f}" if digits is not None else repr(value)
    return str(value)


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts (empty list when it does not exist)."""
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def ordered_columns(rows: Iterable[Mapping[str, object]], first: Iterable[str] = COLUMNS
                    ) -> list[str]:
    """``first`` in order, then every other key seen in ``rows``, sorted."""
    head = list(first)
    extra = sorted({k for r in rows for k in r} - set(head))
    return head + extra


def write_csv(path: Path, rows: list[Mapping[str, object]], columns: list[str]) -> None:
    """Write ``rows`` to ``path`` atomically (:func:`~anomaly_bench.fsutil.atomic_open`)."""
    with atomic_open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: format_value(k, row.get(k)) for k in columns})


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (read-modify-write of a shared file).

    Several processes (joblib or SLURM jobs sharing a run directory) may add rows to one
    results.csv at once; without the lock two of them read the same old file and the
    second rename drops the first one's row.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_row(path: Path, row: Mapping[str, object]) -> None:
    """Insert or replace (by ``category``) one row of results.csv, atomically and locked."""
    with locked(path):
        rows: list[Mapping[str, object]] = [
            r for r in read_rows(path) if r.get("category") != str(row.get("category"))
        ]
        rows.append(dict(row))
        write_csv(path, rows, ordered_columns(rows))


def completed_categories(path: Path) -> set[str]:
    """Categories that already have a row (a resumed run skips them)."""
    return {r["category"] for r in read_rows(path) if r.get("category")}
