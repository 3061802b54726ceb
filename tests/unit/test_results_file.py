"""results.csv under concurrent writers, and the mode of the files the project writes."""

from __future__ import annotations

import multiprocessing as mp
import os
import stat
from pathlib import Path

from anomaly_bench.fsutil import atomic_open
from anomaly_bench.report.results import read_rows, write_row


def _write(args: tuple[str, int]) -> None:
    path, i = args
    write_row(Path(path), {"method": "padim", "category": f"c{i:02d}",
                           "image_auroc": i / 40})


def test_forty_concurrent_writers_keep_every_row(tmp_path):
    path = tmp_path / "results.csv"
    with mp.get_context("fork").Pool(8) as pool:
        pool.map(_write, [(str(path), i) for i in range(40)], chunksize=1)
    rows = read_rows(path)
    assert sorted(r["category"] for r in rows) == [f"c{i:02d}" for i in range(40)]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_category_row_is_replaced_not_duplicated(tmp_path):
    path = tmp_path / "results.csv"
    write_row(path, {"category": "a", "image_auroc": 0.5})
    write_row(path, {"category": "b", "image_auroc": 0.6})
    write_row(path, {"category": "a", "image_auroc": 0.7})
    assert [(r["category"], r["image_auroc"]) for r in read_rows(path)] == [
        ("b", "0.600000"), ("a", "0.700000")]


def test_files_get_the_mode_of_the_process_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_open(tmp_path / "a.txt") as fh:
            fh.write("x")
        os.umask(0o077)
        with atomic_open(tmp_path / "b.txt") as fh:
            fh.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o600


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("old\n")
    try:
        with atomic_open(path) as fh:
            fh.write("half")
            raise RuntimeError("crash")
    except RuntimeError:
        pass
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["results.csv"]
