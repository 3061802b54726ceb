"""A hostile or unlucky user: crafted checkpoints, escaping names, mismatched runs, crashes.

Each test states what must hold: no code runs from a file, nothing is written outside the
run directory, a mismatch is a clear error, and nothing computed is lost.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures import compose_config
from PIL import Image

from anomaly_bench.errors import ConfigError
from anomaly_bench.report.results import COLUMNS, read_rows
from anomaly_bench.runner import Runner

from cli_helpers import FAST, make_mvtec, run_cli

pytestmark = pytest.mark.slow


def assert_clean_error(res, *needles):
    assert res.code == 2, (res.code, res.stderr[-3000:])
    assert "Traceback" not in res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr[-3000:]


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def mvtec(tmp_path):
    return make_mvtec(tmp_path / "mvtec", categories=("bottle", "screw"))


class _Command:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_runs_no_code(mvtec, tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "model.pt"
    with evil.open("wb") as fh:
        pickle.dump({"format": "anomaly-bench/2", "state_dict": _Command(marker)}, fh)
    res = run_cli(["dataset=mvtec", f"dataset.root={mvtec}", "dataset.category=bottle",
                   "stage=test", f"checkpoint={evil}"], tmp_path / "run")
    assert_clean_error(res, f"checkpoint={evil} cannot be read")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs_category", "a/b"])
def test_a_category_name_cannot_escape_the_run_dir(tmp_path, name):
    data = make_mvtec(tmp_path / "data", categories=("cat",)) / "cat"
    (tmp_path / "work").mkdir()
    before = _files_under(tmp_path)
    res = run_cli(["dataset=folder", f"dataset.root={data}", f"dataset.category={name}"],
                  tmp_path / "work" / "run")
    assert_clean_error(res, "dataset.category=", "plain name")
    written = _files_under(tmp_path) - before
    assert all((tmp_path / "work" / "run") in p.parents for p in written), written


def _row(run_dir: Path, category: str) -> dict[str, str]:
    (row,) = [r for r in read_rows(run_dir / "results.csv") if r["category"] == category]
    return row


def test_stage_test_refuses_another_setting_and_names_both(mvtec, tmp_path):
    base = ["dataset=mvtec", f"dataset.root={mvtec}", "dataset.category=bottle"]
    train = run_cli([*base, "stage=train"], tmp_path / "train")
    assert train.code == 0, train.stderr[-2000:]
    ckpt = tmp_path / "train" / "bottle" / "model.pt"
    res = run_cli([*base, "stage=test", f"checkpoint={ckpt}", "method=patchcore"],
                  tmp_path / "t1")
    assert_clean_error(res, "method.name='padim'", "method.name='patchcore'")
    res = run_cli([*base, "stage=test", f"checkpoint={ckpt}", "resolution.size=96"],
                  tmp_path / "t2")
    assert_clean_error(res, "resolution.size=64", "resolution.size=96")
    res = run_cli([*base, "stage=test", f"checkpoint={ckpt}", "seed=3"], tmp_path / "t3")
    assert_clean_error(res, "weights='random(seed=0)'", "weights='random(seed=3)'")
    other = ["dataset=mvtec", f"dataset.root={mvtec}", "dataset.category=screw",
             "stage=test", f"checkpoint={ckpt}"]
    res = run_cli(other, tmp_path / "t4")
    assert_clean_error(res, "category='bottle'", "category='screw'", "allow_other_category")
    ok = run_cli([*other, "allow_other_category=true"], tmp_path / "t5")
    assert ok.code == 0, ok.stderr[-2000:]
    row = _row(tmp_path / "t5", "screw")
    assert row["method"] == "padim" and "allow_other_category=true" in row["overrides"]
    same = run_cli([*base, "stage=test", f"checkpoint={ckpt}"], tmp_path / "t6")
    assert same.code == 0 and _row(tmp_path / "t6", "bottle")["method"] == "padim"


def test_a_damaged_checkpoint_is_an_error(mvtec, tmp_path):
    base = ["dataset=mvtec", f"dataset.root={mvtec}", "dataset.category=bottle"]
    assert run_cli([*base, "stage=train"], tmp_path / "train").code == 0
    ckpt = tmp_path / "train" / "bottle" / "model.pt"
    data = bytearray(ckpt.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    ckpt.write_bytes(bytes(data))
    res = run_cli([*base, "stage=test", f"checkpoint={ckpt}"], tmp_path / "test")
    assert_clean_error(res, f"checkpoint={ckpt}")
    assert "corrupt" in res.stderr
    assert not (tmp_path / "test" / "results.csv").exists()


def test_resume_reuses_only_the_same_configuration(mvtec, tmp_path):
    run = tmp_path / "run"
    base = ["dataset=mvtec", f"dataset.root={mvtec}"]
    first = run_cli(base, run)
    assert first.code == 0, first.stderr[-2000:]
    rows = read_rows(run / "results.csv")
    again = run_cli(base, run)
    assert again.code == 0 and "skipped (resume=true)" in again.stderr + again.stdout
    assert read_rows(run / "results.csv") == rows  # nothing recomputed
    config = run / "bottle" / "config.json"
    stored = json.loads(config.read_text())
    del stored["method"]["blur_border"]  # a row written before that key existed ...
    config.write_text(json.dumps(stored))
    _previous_format(run / "results.csv")  # ... and before rows carried their digest
    rows = read_rows(run / "results.csv")
    older = run_cli(base, run)
    assert older.code == 0 and "skipped (resume=true)" in older.stderr + older.stdout
    other = run_cli([*base, "method=patchcore"], run)
    assert_clean_error(other, "already holds a result for category bottle",
                       "method.name: 'padim' there, 'patchcore' now", "resume=false")
    assert read_rows(run / "results.csv") == rows
    seed = run_cli([*base, "seed=1"], run)
    assert_clean_error(seed, "seed: 0 there, 1 now")
    redo = run_cli([*base, "method=patchcore", "resume=false"], run)
    assert redo.code == 0, redo.stderr[-2000:]
    assert {r["method"] for r in read_rows(run / "results.csv")} == {"patchcore"}


def _previous_format(path: Path) -> None:
    """Rewrite results.csv as the previous version of the format wrote it (no digest)."""
    rows = read_rows(path)
    old = [c for c in COLUMNS if c != "record_sha256"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=old, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _runner(tmp_path: Path, mvtec: Path, *extra: str) -> Runner:
    cfg = compose_config([*FAST, "dataset=mvtec", f"dataset.root={mvtec}", "device=cpu",
                          *extra])
    return Runner(cfg, tmp_path / "run", ["dataset=mvtec"])


def test_a_plot_failure_keeps_the_results(mvtec, tmp_path, monkeypatch, caplog):
    from anomaly_bench.report import plots

    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(plots, "plot_score_histogram", broken)
    with caplog.at_level(logging.WARNING, logger="anomaly_bench"):
        rows = _runner(tmp_path, mvtec, "dataset.category=bottle").run()
    assert len(rows) == 1
    (row,) = read_rows(tmp_path / "run" / "results.csv")
    assert float(row["image_auroc"]) == pytest.approx(rows[0]["image_auroc"], abs=1e-6)
    assert (tmp_path / "run" / "bottle" / "scores.csv").is_file()
    assert "plots not written (RuntimeError: no display)" in caplog.text


def test_an_unwritable_category_dir_reports_the_computed_row(mvtec, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "bottle").write_text("a file where the category folder goes")
    res = run_cli(["dataset=mvtec", f"dataset.root={mvtec}", "dataset.category=bottle"],
                  tmp_path / "run")
    assert_clean_error(res, "cannot write the results of category bottle", "image_auroc=",
                       "pixel_auroc=", "aupro=")


def test_ctrl_c_keeps_finished_rows_and_the_next_run_resumes(mvtec, tmp_path):
    run = tmp_path / "run"
    args = [*FAST, "dataset=mvtec", f"dataset.root={mvtec}", f"hydra.run.dir={run}"]
    # a KeyboardInterrupt while the second category runs, as Ctrl-C would raise it
    script = (
        "import sys\n"
        "from anomaly_bench import cli, runner\n"
        "original = runner.Runner._test\n"
        "def _test(self, fitted, split, *a):\n"
        "    if split.category == 'screw':\n"
        "        raise KeyboardInterrupt\n"
        "    return original(self, fitted, split, *a)\n"
        "runner.Runner._test = _test\n"
        f"sys.argv = ['anomaly-bench', *{args!r}]\n"
        "cli.main()\n"
    )
    import subprocess

    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    message = [line for line in proc.stderr.splitlines() if line.startswith("anomaly-bench:")]
    assert len(message) == 1 and "interrupted" in message[0] and str(run) in message[0]
    assert "Traceback" not in proc.stderr
    assert [r["category"] for r in read_rows(run / "results.csv")] == ["bottle"]
    resumed = run_cli(["dataset=mvtec", f"dataset.root={mvtec}"], run)
    assert resumed.code == 0, resumed.stderr[-2000:]
    assert "bottle: already in" in resumed.stderr + resumed.stdout
    with (run / "results.csv").open(newline="") as fh:
        assert next(csv.reader(fh)) == list(COLUMNS)
    assert [r["category"] for r in read_rows(run / "results.csv")] == ["bottle", "screw"]


def _mixed_sizes(root: Path) -> Path:
    make_mvtec(root, categories=("part",), size=48)
    rng = np.random.default_rng(0)
    odd = rng.integers(60, 120, (40, 56, 3)).astype(np.uint8)
    Image.fromarray(odd).save(root / "part" / "train" / "good" / "900.png")
    return root


def test_native_resolution_with_mixed_sizes(tmp_path):
    data = _mixed_sizes(tmp_path / "mixed")
    native = ["backbone=resnet18", "backbone.pretrained=false", "resolution=native",
              "dataset=mvtec", f"dataset.root={data}"]
    res = run_cli([*native, "batch_size=1"], tmp_path / "padim", fast=False)
    assert_clean_error(res, "resolution=native", "2 sizes", "56x40", "48x48",
                       "padim models every feature position")
    assert not (tmp_path / "padim" / "part").exists()  # refused before fitting
    res = run_cli([*native, "method=patchcore"], tmp_path / "pc", fast=False)
    assert_clean_error(res, "batch_size=16 stacks images of one size")
    res = run_cli([*native, "method=patchcore", "batch_size=1"], tmp_path / "pc1", fast=False)
    assert res.code == 0, res.stderr[-2000:]
    assert 0 <= float(_row(tmp_path / "pc1", "part")["pixel_auroc"]) <= 1


@pytest.mark.parametrize(("override", "needle"), [
    ("resolution.size=abc", "resolution.size='abc'"),
    ("method.n_features=10.5", "method.n_features=10.5"),
    ("method.reg=0", "method.reg=0"),
])
def test_bad_values_are_one_paragraph_before_any_data_is_read(tmp_path, override, needle):
    res = run_cli([f"data_root={tmp_path / 'nowhere'}", override], tmp_path / "r")
    assert_clean_error(res, needle, "is not allowed: expected")


def test_runner_validation_is_the_same_step(tmp_path, mvtec):
    with pytest.raises(ConfigError, match=r"method\.embed_dim=0"):
        _runner(tmp_path, mvtec, "method=patchcore", "method.embed_dim=0")
