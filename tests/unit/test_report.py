"""results.csv writing, sweep summaries and plots."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import yaml

from anomaly_bench.errors import AnomalyBenchError
from anomaly_bench.report import plots
from anomaly_bench.report.results import COLUMNS, completed_categories, read_rows, write_row
from anomaly_bench.report.summary import main as summary_main
from anomaly_bench.report.summary import write_summary


def _row(category: str, auroc: float | None = 0.9, **extra):
    base = {c: None for c in COLUMNS}
    base.update(method="padim", dataset="synthetic", category=category, image_auroc=auroc,
                pixel_auroc=0.8, aupro=None, image_f1_max=0.7, seed=0, ms_per_image=12.345)
    base.update(extra)
    return base


def test_write_row_keeps_column_order_and_replaces_by_category(tmp_path):
    path = tmp_path / "results.csv"
    write_row(path, _row("a"))
    write_row(path, _row("b", extra_col="x"))
    write_row(path, _row("a", auroc=0.5))
    with path.open(newline="") as fh:
        header = next(csv.reader(fh))
    assert header == [*COLUMNS, "extra_col"]
    rows = read_rows(path)
    assert [r["category"] for r in rows] == ["b", "a"]
    assert rows[1]["image_auroc"] == "0.500000" and rows[1]["aupro"] == ""
    assert rows[0]["extra_col"] == "x" and rows[0]["ms_per_image"] == "12.35"
    assert completed_categories(path) == {"a", "b"}


def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    write_row(path, _row("a"))
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_row(path, _row("b"))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # no temp file left


def _fake_sweep(root):
    values = [("0", "3"), ("1", "3"), ("2", "3")]
    for job, (l1, l2) in enumerate(values):
        d = root / str(job)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump([f"layers.layer1={l1}", f"layers.layer2={l2}", "method=padim"]))
        for cat, auroc in (("x", 0.5 + 0.1 * job), ("y", 0.9 - 0.2 * job)):
            write_row(d / "results.csv", _row(cat, auroc=auroc))
    return root


def test_summary_ranks_settings_and_marks_default(tmp_path):
    sweep = _fake_sweep(tmp_path / "sweep")
    csv_path, md_path = write_summary(sweep, default_marks={"layers.layer1": "2"})
    rows = read_rows(csv_path)
    assert len(rows) == 6 and rows[0]["layers.layer1"] == "0" and rows[0]["job"] == "0"
    assert "layers.layer2" not in rows[0]  # not swept: the same in every job
    md = md_path.read_text().splitlines()
    table = [line for line in md if line.startswith("| ") and "---" not in line][1:]
    # means over categories: job0 0.7, job1 0.65, job2 0.6
    assert [line.split("|")[1].strip() for line in table] == ["0", "1", "2 (default)"]
    assert "**0.7000**" in table[0]


def test_summary_draws_best_and_default_settings_from_job_scores(tmp_path):
    sweep = _fake_sweep(tmp_path / "sweep")
    for job in range(3):
        for cat in ("x", "y"):
            lines = ["path,label,defect_type,score"] + [
                f"{i}.png,{i % 2},{'crack' if i % 2 else 'good'},{0.1 * i + job}"
                for i in range(8)]
            (sweep / str(job) / cat).mkdir()
            (sweep / str(job) / cat / "scores.csv").write_text("\n".join(lines) + "\n")
    _, md_path = write_summary(sweep, default_marks={"layers.layer1": "2"})
    md = md_path.read_text()
    assert "## Best setting: layers.layer1=0" in md
    assert "## Default setting: layers.layer1=2" in md
    for tag in ("best", "default"):
        for cat in ("x", "y"):
            for kind in ("roc", "score_scatter"):
                png = sweep / "figures" / f"{tag}_{cat}_{kind}.png"
                assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                assert f"(figures/{tag}_{cat}_{kind}.png)" in md


def test_summary_cli_and_missing_results(tmp_path, capsys):
    sweep = _fake_sweep(tmp_path / "sweep")
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(
        {"summary": {"metric": "pixel_auroc", "default": {"layers.layer1": 0}}}))
    assert summary_main([str(sweep)]) == 0
    assert "0 (default)" in (sweep / "summary.md").read_text()
    assert "ranked by pixel_auroc" in capsys.readouterr().out
    empty = tmp_path / "empty"
    (empty / "0").mkdir(parents=True)
    with pytest.raises(AnomalyBenchError, match="no finished job"):
        write_summary(empty)
    assert summary_main([str(empty)]) == 2


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0, 1, 20), rng.normal(2, 1, 20)]
    labels = np.r_[np.zeros(20, int), np.ones(20, int)]
    for fn in (plots.plot_roc, plots.plot_score_histogram, plots.plot_score_scatter):
        out = fn(tmp_path / f"{fn.__name__}.png", scores, labels, "padim · x")
        assert out is not None and out.stat().st_size > 10_000
    assert plots.plot_roc(tmp_path / "none.png", scores, np.zeros(40, int), "t") is None
    images = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    maps = rng.random((3, 32, 32))
    masks = np.zeros((3, 32, 32), bool)
    masks[0, 4:9, 4:9] = True
    out = plots.plot_overlay_grid(tmp_path / "grid.png", images, maps, masks, ["a", "b", "c"],
                                  0.0, 1.0)
    assert out.stat().st_size > 10_000


def test_f1_threshold_is_the_best_cut():
    scores = np.array([0.1, 0.2, 0.35, 0.4, 0.8, 0.9])
    labels = np.array([0, 0, 1, 0, 1, 1])
    assert plots._f1_threshold(scores, labels) == pytest.approx(0.35)


def test_texture_presets_compose_the_source_versions():
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[2] / "conf"
    got = {}
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        for v in range(1, 7):
            c = compose("config", overrides=[f"experiment=texture_v0{v}"])
            got[v] = (c.method.impl, c.backbone.name, c.backbone.truncate, c.resolution.size,
                      c.layers.layer2, c.layers.layer3)
    assert got[1] == ("reference", "wide_resnet50_2", False, 320, -1, None)  # hook, full net
    assert got[2] == ("reference", "wide_resnet50_2", True, 320, -1, None)  # stop after layer2
    assert got[3] == ("fast", "wide_resnet50_2", False, 320, -1, None)  # vectorised scores
    assert got[4] == ("fast", "wide_resnet50_2", True, 320, -1, None)
    assert got[5] == ("fast", "resnet50", True, 320, -1, None)  # slim bottlenecks
    assert got[6] == ("fast", "wide_resnet50_2", True, 1024, -1, None)
