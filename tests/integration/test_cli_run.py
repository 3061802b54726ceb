"""End-to-end runs of the command on the synthetic dataset and on tiny official layouts."""

from __future__ import annotations

import math
import shutil

import pytest

from anomaly_bench.report.results import COLUMNS

from cli_helpers import make_mvtec, run_cli

pytestmark = pytest.mark.slow  # every test is a full run of the command

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")


@pytest.fixture(scope="module")
def synthetic_run(synthetic_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "out"
    res = run_cli([f"dataset.root={synthetic_root}"], run_dir)
    assert res.code == 0, res.stderr
    return res


def test_results_csv_has_design_columns_and_one_row_per_category(synthetic_run):
    assert synthetic_run.header() == list(COLUMNS)
    rows = synthetic_run.rows()
    assert [r["category"] for r in rows] == ["grain", "rotated_part", "stripes"]
    for r in rows:
        assert r["method"] == "padim" and r["backbone"] == "resnet18"
        assert r["weights"] == "random(seed=0)"
        assert r["layers"] == "layer1.1+layer2.1+layer3.1"  # resnet18: 2 blocks per stage
        assert r["resolution"] == "64"
        for m in METRICS:
            assert 0.0 <= float(r[m]) <= 1.0
        assert int(r["n_train"]) > 0 and int(r["n_test"]) > 0
        assert float(r["ms_per_image"]) > 0 and float(r["peak_mem_mb"]) > 0
        assert r["device"] == "cpu"
        assert "backbone.pretrained=false" in r["overrides"]


def test_plots_and_scores_are_written(synthetic_run):
    for cat in ("grain", "rotated_part", "stripes"):
        d = synthetic_run.run_dir / cat
        for name in ("roc.png", "score_hist.png", "score_scatter.png", "overlays.png"):
            assert (d / "plots" / name).stat().st_size > 5000
        scores = synthetic_run.rows(f"{cat}/scores.csv")
        assert {s["label"] for s in scores} == {"0", "1"}


def test_train_then_test_reproduces_scores_exactly(synthetic_root, tmp_path, synthetic_run):
    common = [f"dataset.root={synthetic_root}", "dataset.category=stripes"]
    train = run_cli([*common, "stage=train"], tmp_path / "train")
    assert train.code == 0, train.stderr
    assert (tmp_path / "train" / "stripes" / "model.pt").is_file()
    assert not (tmp_path / "train" / "results.csv").exists()
    test = run_cli([*common, "stage=test", f"checkpoint={tmp_path / 'train'}"], tmp_path / "test")
    assert test.code == 0, test.stderr
    ref = synthetic_run.rows("stripes/scores.csv")
    assert test.rows("stripes/scores.csv") == ref  # bit-identical per-image scores
    ref_row = next(r for r in synthetic_run.rows() if r["category"] == "stripes")
    got_row = test.rows()[0]
    for m in METRICS:
        assert got_row[m] == ref_row[m]
    # a single model.pt works too when one category is selected
    again = run_cli([*common, "stage=test", f"checkpoint={tmp_path / 'train/stripes/model.pt'}"],
                    tmp_path / "test2")
    assert again.code == 0 and again.rows("stripes/scores.csv") == ref


def test_mvtec_layout_all_categories_and_single_category(tmp_path):
    data = make_mvtec(tmp_path / "data" / "mvtec")
    res = run_cli(["dataset=mvtec", "dataset.category=all", f"data_root={tmp_path / 'data'}"],
                  tmp_path / "all")
    assert res.code == 0, res.stderr
    assert [r["category"] for r in res.rows()] == ["bottle", "screw"]
    one = run_cli(["dataset=mvtec_screw", f"data_root={data}"], tmp_path / "one")
    assert one.code == 0, one.stderr
    rows = one.rows()
    assert len(rows) == 1 and rows[0]["category"] == "screw" and rows[0]["dataset"] == "mvtec"


def test_folder_without_masks_leaves_pixel_metrics_empty(tmp_path):
    make_mvtec(tmp_path / "src", categories=("part",), masks=False)
    res = run_cli(["dataset=folder", f"dataset.root={tmp_path / 'src' / 'part'}"], tmp_path / "run")
    assert res.code == 0, res.stderr
    row = res.rows()[0]
    assert row["pixel_auroc"] == "" and row["aupro"] == ""
    assert 0.0 <= float(row["image_auroc"]) <= 1.0


def test_one_class_test_set_completes_with_empty_metrics(tmp_path):
    data = make_mvtec(tmp_path / "mvtec", categories=("bottle",))
    shutil.rmtree(data / "bottle" / "test" / "crack")
    shutil.rmtree(data / "bottle" / "ground_truth")
    res = run_cli(["dataset=mvtec", f"dataset.root={data}"], tmp_path / "run")
    assert res.code == 0, res.stderr
    row = res.rows()[0]
    assert all(row[m] == "" for m in METRICS)
    assert not math.isnan(float(row["ms_per_image"]))


def test_resume_skips_completed_categories(synthetic_root, tmp_path):
    args = [f"dataset.root={synthetic_root}", "dataset.category=grain"]
    first = run_cli(args, tmp_path / "run")
    assert first.code == 0, first.stderr
    stamp = (first.run_dir / "results.csv").stat().st_mtime_ns
    second = run_cli(args, tmp_path / "run")
    assert second.code == 0
    assert (first.run_dir / "results.csv").stat().st_mtime_ns == stamp
