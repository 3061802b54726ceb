"""fit_scope=dataset: one model fitted on every category, tested on any dataset's categories."""

from __future__ import annotations

import csv

import pytest
from fixtures import compose_config, write_visa

from anomaly_bench import checkpoint
from anomaly_bench.errors import CheckpointError, ConfigError
from anomaly_bench.report.results import read_rows
from anomaly_bench.runner import Runner

from cli_helpers import FAST, make_mvtec

pytestmark = pytest.mark.slow


def _run(tmp_path, name, *overrides):
    cfg = compose_config([*FAST, "device=cpu", "plots.enabled=false", "fit_scope=dataset",
                          *overrides])
    Runner(cfg, tmp_path / name).run()
    return tmp_path / name


def _scores(run_dir, category):
    with (run_dir / category / "scores.csv").open(newline="") as fh:
        return [(r["path"], r["score"]) for r in csv.DictReader(fh)]


def test_one_model_for_every_category_and_testing_on_another_dataset(tmp_path):
    train_data = make_mvtec(tmp_path / "a", categories=("bottle", "screw"))
    other = write_visa(tmp_path / "visa")
    fit = _run(tmp_path, "fit", "dataset=mvtec", f"dataset.root={train_data}", "stage=train")
    payload = checkpoint.load(fit / "model.pt")
    assert payload["meta"]["category"] == "all" and payload["meta"]["dataset"] == "mvtec"
    assert not (fit / "bottle").exists() and not (fit / "results.csv").exists()

    both = _run(tmp_path, "both", "dataset=mvtec", f"dataset.root={train_data}")
    rows = {r["category"]: r for r in read_rows(both / "results.csv")}
    assert list(rows) == ["bottle", "screw"]
    assert {r["n_train"] for r in rows.values()} == {"12"}  # 6 + 6 images, one model

    again = _run(tmp_path, "again", "dataset=mvtec", f"dataset.root={train_data}",
                 "stage=test", f"checkpoint={fit}")
    for category in ("bottle", "screw"):  # the saved model scores as the fitted one did
        assert _scores(again, category) == _scores(both, category)

    # trained on all of (tiny) MVTec AD, tested on every VisA category
    transfer = _run(tmp_path, "transfer", "dataset=visa", f"dataset.root={other}",
                    "stage=test", f"checkpoint={fit}")
    got = {r["category"]: r for r in read_rows(transfer / "results.csv")}
    assert list(got) == ["candle", "pcb1"] and all(r["dataset"] == "visa" for r in got.values())
    assert all(0 <= float(r["image_auroc"]) <= 1 for r in got.values())


def test_dataset_scope_still_checks_the_method_and_refuses_alignment(tmp_path):
    data = make_mvtec(tmp_path / "a", categories=("bottle",))
    fit = _run(tmp_path, "fit", "dataset=mvtec", f"dataset.root={data}", "stage=train")
    with pytest.raises(CheckpointError, match=r"method\.name='padim'"):
        _run(tmp_path, "bad", "dataset=mvtec", f"dataset.root={data}", "stage=test",
             f"checkpoint={fit}", "method=patchcore")
    with pytest.raises(ConfigError, match="alignment=orb90"):
        _run(tmp_path, "aligned", "dataset=mvtec", f"dataset.root={data}", "alignment=orb90")
