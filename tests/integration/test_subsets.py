"""A dataset with named test subsets: one row per subset besides the category's own."""

from __future__ import annotations

import csv

import pytest
import torch
from fixtures import compose_config, write_aebad_s

from anomaly_bench.metrics import compute_metrics
from anomaly_bench.report.results import COLUMNS, read_rows
from anomaly_bench.runner import Runner

from cli_helpers import FAST

pytestmark = pytest.mark.slow


def test_each_domain_gets_its_row_with_its_own_metrics(tmp_path):
    root = write_aebad_s(tmp_path / "data")
    cfg = compose_config([*FAST, "dataset=aebad_s", f"data_root={root}", "device=cpu",
                          "plots.enabled=false"])
    Runner(cfg, tmp_path / "run").run()
    with (tmp_path / "run" / "results.csv").open(newline="") as fh:
        assert next(csv.reader(fh)) == list(COLUMNS)  # no column added or moved
    rows = {r["category"]: r for r in read_rows(tmp_path / "run" / "results.csv")}
    domains = ("same", "background", "illumination", "view")
    assert list(rows) == ["AeBAD_S", *(f"AeBAD_S/{d}" for d in domains)]
    assert rows["AeBAD_S"]["n_test"] == "16"
    with (tmp_path / "run" / "AeBAD_S" / "scores.csv").open(newline="") as fh:
        scores = list(csv.DictReader(fh))
    for d in domains:
        row = rows[f"AeBAD_S/{d}"]
        mine = [s for s in scores if f"/{d}/" in s["path"]]
        assert row["n_test"] == str(len(mine)) == "4"
        expected = compute_metrics(torch.tensor([float(s["score"]) for s in mine]),
                                   torch.tensor([int(s["label"]) for s in mine]), None, None)
        assert float(row["image_auroc"]) == pytest.approx(expected["image_auroc"], abs=1e-6)
        assert row["pixel_auroc"] != "" and row["method"] == "padim"
        assert row["n_train"] == "6" and row["test_s"] == ""
