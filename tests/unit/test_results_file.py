"""results.csv under concurrent writers and damage, and the mode of the files the project writes."""

from __future__ import annotations

import csv
import errno
import multiprocessing as mp
import os
import stat
from pathlib import Path

import pytest

from anomaly_bench.errors import DataError
from anomaly_bench.fsutil import NoFollowFileHandler, WriteError, atomic_open, describe
from anomaly_bench.report.results import (
    COLUMNS,
    completed_categories,
    from_cell,
    read_rows,
    to_cell,
    write_row,
)


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


# ---------------------------------------------------------------------- damaged files
def _full_row(category: str, auroc: float) -> dict:
    return {"method": "padim", "backbone": "resnet18", "weights": "random(seed=0)",
            "dataset": "mvtec", "category": category, "layers": "layer1.1", "resolution": "64",
            "alignment": "none", "seed": 0, "image_auroc": auroc, "pixel_auroc": 0.9,
            "aupro": None, "image_f1_max": 0.8, "n_train": 6, "n_test": 6, "train_s": 1.0,
            "test_s": 0.5, "ms_per_image": 80.0, "peak_mem_mb": 900.0, "device": "cpu",
            "overrides": "dataset=mvtec seed=0"}


def _results(tmp_path) -> Path:
    path = tmp_path / "results.csv"
    write_row(path, _full_row("bottle", 0.75))
    write_row(path, _full_row("screw", 0.5))
    return path


def _damage(path: Path, how: str) -> int:
    """Damage results.csv as a crash, a hand edit or another program would; the line."""
    lines = path.read_text().splitlines(keepends=True)
    if how == "cut":  # the last row cut after pixel_auroc, as a full disk leaves it
        fields = lines[2].split(",")
        lines[2] = ",".join(fields[: fields.index("0.900000") + 1])
    elif how == "garbage":
        lines.insert(2, "this is not a row\n")
    elif how == "too_many":
        lines[1] = lines[1].rstrip("\n") + ",surplus\n"
        path.write_text("".join(lines))
        return 2
    elif how == "fragment":
        lines.append(",,,\n")
    elif how == "bad_metric":
        lines[2] = lines[2].replace("0.500000", "1.500000", 1)
    elif how == "foreign":
        lines = ["path,label,defect_type,score\n", "a.png,0,good,0.5\n"]
        path.write_text("".join(lines))
        return 1
    path.write_text("".join(lines))
    return 3 if how in ("cut", "garbage", "bad_metric") else len(lines)


DAMAGES = ["cut", "garbage", "too_many", "fragment", "bad_metric", "foreign"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_line_stops_the_readers_naming_file_and_line(tmp_path, how):
    path = _results(tmp_path)
    line = _damage(path, how)
    for reader in (read_rows, completed_categories):
        with pytest.raises(DataError) as err:
            reader(path)
        text = str(err.value)
        assert f"{path}, line {line}," in text and "resume=false" in text, text
        assert "\n" not in text


@pytest.mark.parametrize("how", DAMAGES)
def test_a_writer_keeps_every_valid_row_and_sets_damaged_lines_aside(tmp_path, how):
    path = _results(tmp_path)
    _damage(path, how)
    before = path.read_text().splitlines()
    write_row(path, _full_row("zipper", 0.25))
    with path.open(newline="") as fh:
        assert next(csv.reader(fh)) == list(COLUMNS)  # no unnamed column
    rows = read_rows(path)
    valid = {"cut": ["bottle"], "garbage": ["bottle", "screw"], "too_many": ["screw"],
             "fragment": ["bottle", "screw"], "bad_metric": ["bottle"], "foreign": []}[how]
    assert [r["category"] for r in rows] == [*valid, "zipper"]
    aside = (tmp_path / "results.csv.damaged").read_text().splitlines()
    assert aside and all(line in before for line in aside)


NEW_METRICS = ["image_ap", "pixel_ap", "pixel_f1_max", "aupro_200", "aupro_200_per_image"]


@pytest.mark.parametrize("dropped", [["record_sha256", *NEW_METRICS], NEW_METRICS],
                         ids=["first_format", "before_new_metrics"])
def test_rows_of_previous_formats_are_read_and_kept(tmp_path, dropped):
    path = tmp_path / "results.csv"
    old = [c for c in COLUMNS if c not in dropped]  # the header written before
    assert old[:21] == list(COLUMNS[:21])  # the first 21 columns never move
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=old)
        w.writeheader()
        w.writerow({k: v for k, v in _full_row("bottle", 0.75).items() if k in old})
    assert [r["category"] for r in read_rows(path)] == ["bottle"]
    assert completed_categories(path) == {"bottle"}
    write_row(path, {**_full_row("screw", 0.5), "pixel_ap": 0.25, "aupro_200": None})
    with path.open(newline="") as fh:
        assert next(csv.reader(fh)) == list(COLUMNS)
    rows = read_rows(path)
    assert [(r["category"], r["record_sha256"]) for r in rows] == [("bottle", ""), ("screw", "")]
    assert [(r["pixel_ap"], r["aupro_200"]) for r in rows] == [("", ""), ("0.250000", "")]


def test_new_metric_columns_sit_between_overrides_and_the_digest():
    i = COLUMNS.index("overrides")
    assert list(COLUMNS[i + 1 :]) == [*NEW_METRICS, "record_sha256"]


# ---------------------------------------------------------------------- links, write errors
@pytest.mark.parametrize("dangling", [False, True])
def test_nothing_is_written_through_a_symbolic_link(tmp_path, dangling):
    victim = tmp_path / "elsewhere" / "victim"
    victim.parent.mkdir()
    if not dangling:
        victim.write_text("not yours")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.pt", "cli.log", ".results.csv.lock"):
        (run / name).symlink_to(victim)
    with pytest.raises(WriteError) as err:
        with atomic_open(run / "model.pt", "wb") as fh:
            fh.write(b"weights")
    assert err.value.errno == errno.ELOOP and err.value.filename == str(run / "model.pt")
    assert "symbolic link" in describe(err.value)
    with pytest.raises(WriteError):
        NoFollowFileHandler(str(run / "cli.log"))
    with pytest.raises(WriteError):
        write_row(run / "results.csv", _full_row("bottle", 0.5))
    assert (not victim.exists()) if dangling else victim.read_text() == "not yours"
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_writer_that_wraps_its_os_error_gives_a_write_error(tmp_path):
    def torch_like_save(fh):  # torch.save reports a failed write as a RuntimeError
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError:
            raise RuntimeError("unexpected pos 704 vs 598") from None

    with pytest.raises(WriteError) as err:
        with atomic_open(tmp_path / "model.pt", "wb") as fh:
            torch_like_save(fh)
    assert err.value.errno == errno.EFBIG and err.value.filename == str(tmp_path / "model.pt")
    assert "ulimit -f" in describe(err.value)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- formula cells
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
TRICKY = ["=1+2", "+cmd", "-2+3", "@SUM(A1)", "\tx", "\rx", "'=1+2", "'", "''", "-1", "+1.5",
          "-1e-3", "plain", "", "a=b", "=", "-", "-inf"]


def test_cells_are_neutralised_and_read_back(tmp_path):
    assert [to_cell(v) for v in ("=1+2", "-1", "'x", "a=b")] == ["'=1+2", "-1", "''x", "a=b"]
    assert all(from_cell(to_cell(v)) == v for v in TRICKY)
    path = tmp_path / "results.csv"
    for i, value in enumerate(TRICKY):
        write_row(path, {**_full_row(f"c{i}", 0.5), "layers": value,
                         "overrides": value + " seed=0"})
    raw = [c for line in csv.reader(path.open(newline="")) for c in line]
    numbers = ("-1", "+1.5", "-1e-3")  # a plain number is no formula: it stays a number
    assert not [c for c in raw if c.startswith(FORMULA_START) and c not in numbers]
    rows = read_rows(path)
    assert [r["layers"] for r in rows] == TRICKY
    assert [r["overrides"] for r in rows] == [v + " seed=0" for v in TRICKY]


def test_the_sweep_summary_neutralises_and_reads_back(tmp_path):
    import yaml

    from anomaly_bench.report.summary import write_summary

    for job, value in enumerate(("=1+2", "@x")):
        d = tmp_path / "sweep" / str(job)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"method.note={value}"]))
        write_row(d / "results.csv", _full_row("=cmd", 0.5 + job / 10))
    csv_path, _ = write_summary(tmp_path / "sweep")
    raw = [c for line in csv.reader(csv_path.open(newline="")) for c in line]
    assert not [c for c in raw if c.startswith(("=", "+", "-", "@"))]
    rows = read_rows(csv_path)
    assert {r["category"] for r in rows} == {"=cmd"}
    assert sorted(r["method.note"] for r in rows) == ["=1+2", "@x"]


def test_the_report_stops_at_a_damaged_job_row_and_at_a_failed_write(tmp_path, capsys):
    import yaml

    from anomaly_bench.report.summary import main

    for job in (0, 1):
        d = tmp_path / "sweep" / str(job)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={job}"]))
        write_row(d / "results.csv", _full_row("bottle", 0.5))
    damaged = tmp_path / "sweep" / "1" / "results.csv"
    _damage(damaged, "garbage")
    assert main([str(tmp_path / "sweep")]) == 2
    out = capsys.readouterr().out
    assert f"{damaged}, line 3," in out and "Traceback" not in out
    assert not (tmp_path / "sweep" / "summary.csv").exists()
    write_row(damaged, _full_row("screw", 0.5))  # moves the damaged line aside
    (tmp_path / "sweep" / "summary.csv").mkdir()  # a folder where the summary goes
    assert main([str(tmp_path / "sweep")]) == 2
    assert "cannot write" in capsys.readouterr().out


def test_a_category_with_two_rows_is_named_with_both_lines(tmp_path):
    path = _results(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join([*lines, lines[1]]))  # bottle's row again, on line 4
    with pytest.raises(DataError, match=r"line 4, .*bottle already has a row, on line 2"):
        completed_categories(path)
