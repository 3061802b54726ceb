"""results.csv and resume under faults: interrupted writes, damaged files, formula cells.

A row is only worth skipping when it stands for the configuration asked for; whatever
fails between two writes of a category, a resumed run either skips with the row (and
scores) of that configuration or does not skip at all.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from fixtures import compose_config

from anomaly_bench.errors import AnomalyBenchError, ConfigError
from anomaly_bench.report.results import (
    COLUMNS,
    from_cell,
    read_rows,
    record_digest,
    write_row,
)
from anomaly_bench.runner import Runner

from cli_helpers import FAST, make_mvtec, run_cli

pytestmark = pytest.mark.slow

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "seed", "n_test")


def _runner(run: Path, data: Path, *extra: str) -> Runner:
    cfg = compose_config([*FAST, "dataset=mvtec", f"dataset.root={data}", "device=cpu",
                          "dataset.category=bottle", "plots.max_overlays=2", *extra])
    return Runner(cfg, run, ["dataset=mvtec", *extra])


def _state(run: Path) -> tuple[dict[str, str], list[str]]:
    """(the bottle row's metrics, the per-image scores) found in ``run``."""
    (row,) = [r for r in read_rows(run / "results.csv") if r["category"] == "bottle"]
    with (run / "bottle" / "scores.csv").open(newline="") as fh:
        scores = [r["score"] for r in csv.DictReader(fh)]
    return {k: row[k] for k in METRICS}, scores


class _FailingReplace:
    """``os.replace`` that fails (disk full) on the ``k``-th file committed under ``root``."""

    def __init__(self, root: Path, k: int) -> None:
        self.root, self.k, self.count = root.resolve(), k, 0
        self.real = os.replace

    def __call__(self, src, dst, *args, **kwargs):
        if self.root in Path(dst).resolve().parents:
            self.count += 1
            if self.count == self.k:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return self.real(src, dst, *args, **kwargs)


def test_no_fault_between_two_writes_makes_resume_skip_a_stale_row(tmp_path, monkeypatch):
    data = make_mvtec(tmp_path / "mvtec", categories=("bottle",))
    ref = {}
    for seed in (0, 1):
        _runner(tmp_path / f"ref{seed}", data, f"seed={seed}").run()
        ref[seed] = _state(tmp_path / f"ref{seed}")
    assert ref[0] != ref[1]  # the two configurations give different results
    outcomes = []
    for k in range(1, 20):
        run = tmp_path / f"run{k}"
        shutil.copytree(tmp_path / "ref0", run)  # a finished seed-0 run ...
        fault = _FailingReplace(run, k)
        monkeypatch.setattr(os, "replace", fault)
        try:  # ... recomputed with seed 1, the k-th write failing
            _runner(run, data, "seed=1", "resume=false").run()
            failed = False
        except AnomalyBenchError as exc:  # a row that cannot be written is in the message
            assert "No space left on device" in str(exc) and "image_auroc=" in str(exc)
            failed = True
        finally:
            monkeypatch.setattr(os, "replace", fault.real)
        if fault.count < k:  # every write of the category went through
            assert _state(run) == ref[1]
            break
        for seed in (0, 1):
            try:
                rows = _runner(run, data, f"seed={seed}").run()
            except ConfigError:
                outcomes.append((k, seed, "refused"))
                continue
            # skipped (or recomputed): what the directory holds is this seed's result
            assert _state(run) == ref[seed], (k, seed, failed)
            outcomes.append((k, seed, "recomputed" if rows else "skipped"))
    assert k > 3, outcomes  # scores.csv, config.json, results.csv at least
    assert (1, 0, "skipped") in outcomes  # nothing of the seed-1 run landed: seed 0 stands


def test_a_row_keeps_working_when_a_method_key_is_added_later(tmp_path):
    data = make_mvtec(tmp_path / "mvtec", categories=("bottle",))
    run = tmp_path / "run"
    _runner(run, data).run()
    config = run / "bottle" / "config.json"
    stored = json.loads(config.read_text())
    del stored["method"]["blur_border"]  # written by a version before that key existed
    config.write_text(json.dumps(stored))
    (row,) = read_rows(run / "results.csv")
    scores = (run / "bottle" / "scores.csv").read_bytes()
    write_row(run / "results.csv", {**row, "record_sha256": record_digest(stored, scores)})
    assert _runner(run, data).run() == []  # skipped: its default is what ran


def _categories(res) -> list[str]:
    return [r["category"] for r in read_rows(res.run_dir / "results.csv")]


def test_resume_stops_at_a_damaged_row_and_resume_false_recomputes_it(tmp_path):
    data = make_mvtec(tmp_path / "mvtec", categories=("bottle", "screw"))
    run = tmp_path / "run"
    args = ["dataset=mvtec", f"dataset.root={data}", "plots.enabled=false"]
    assert run_cli(args, run).code == 0
    path = run / "results.csv"
    lines = path.read_text().splitlines(keepends=True)
    fields = lines[2].split(",")  # screw's row, cut after pixel_auroc by a full disk
    lines[2] = ",".join(fields[: COLUMNS.index("pixel_auroc") + 1])
    path.write_text("".join(lines) + "garbage\n")
    res = run_cli(args, run)
    assert res.code == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    (message,) = [ln for ln in res.stderr.splitlines() if ln.startswith("anomaly-bench:")]
    assert f"{path}, line 3," in message and "resume=false" in message, message
    assert path.read_text().endswith("garbage\n")  # nothing changed
    redo = run_cli([*args, "resume=false"], run)
    assert redo.code == 0, redo.stderr[-2000:]
    assert _categories(redo) == ["bottle", "screw"]
    aside = (run / "results.csv.damaged").read_text()
    assert aside == lines[2] + "garbage\n"
    again = run_cli(args, run)
    assert again.code == 0 and (again.stderr + again.stdout).count("skipped (resume=true)") == 2


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _raw_cells(path: Path) -> list[str]:
    with path.open(newline="") as fh:
        return [cell for line in csv.reader(fh) for cell in line]


def test_no_cell_a_spreadsheet_would_run_and_every_value_reads_back(tmp_path):
    data = make_mvtec(tmp_path / "mvtec", categories=("=1+2", "@SUM(A1)"))
    for cat in ("=1+2", "@SUM(A1)"):  # a defect folder named like a formula too
        for part in ("test", "ground_truth"):
            (data / cat / part / "crack").rename(data / cat / part / "-crack")
    run = tmp_path / "run"
    args = ["++seed=0", *FAST, "dataset=mvtec", f"dataset.root={data}", "plots.enabled=false"]
    first = run_cli(args, run, fast=False)
    assert first.code == 0, first.stderr[-2000:]
    for path in (run / "results.csv", run / "=1+2" / "scores.csv"):
        cells = _raw_cells(path)
        formulas = [c for c in cells if c.startswith(FORMULA_START)]
        assert not formulas, (path, formulas)
    rows = read_rows(run / "results.csv")
    assert sorted(r["category"] for r in rows) == ["=1+2", "@SUM(A1)"]
    assert all(r["overrides"].startswith("++seed=0 ") for r in rows)
    with (run / "=1+2" / "scores.csv").open(newline="") as fh:
        kinds = {from_cell(r["defect_type"]) for r in csv.DictReader(fh)}
    assert kinds == {"good", "-crack"}
    again = run_cli(args, run, fast=False)  # resume reads the categories back as they are
    assert again.code == 0 and (again.stderr + again.stdout).count("skipped (resume=true)") == 2
