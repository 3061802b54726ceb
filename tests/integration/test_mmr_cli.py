"""MMR through the command: AeBAD-S rows per domain, AeBAD-V without pixel metrics, the
masking sweep's tables, stage=test from the trained encoder, and bad input refused
(exit 2, one paragraph) before any image is read."""

from __future__ import annotations

import pytest
from fixtures import compose_config, write_aebad_s, write_aebad_v
from omegaconf import OmegaConf

from anomaly_bench import checkpoint
from anomaly_bench.methods import build_method
from anomaly_bench.report.results import read_rows
from anomaly_bench.sweep import job_dirs

from cli_helpers import run_cli

pytestmark = pytest.mark.slow

TINY = ["method=mmr", "backbone.name=vit_tiny_patch16_224", "backbone.weights_url=null",
        "backbone.pretrained=false", "method.teacher=resnet18", "resolution.size=64",
        "resolution.crop=null", "method.epochs=2", "method.train.warmup_epochs=1",
        "batch_size=4", "plots.enabled=false", "device=cpu"]


def _corrupt_images(root):
    """Every image becomes unreadable: a run that reads one fails with a DataError naming
    it, so an error about a key proves nothing was read."""
    for p in list(root.rglob("*.png")) + list(root.rglob("*.jpg")):
        p.write_bytes(b"not an image")
    return root


def test_aebad_s_rows_sweep_tables_and_stage_test(tmp_path):
    root = write_aebad_s(tmp_path / "data")
    sweep = tmp_path / "sweep"
    res = run_cli(["-m", *TINY, "dataset=aebad_s", f"data_root={root}",
                   "method.masking=random,saliency", "summary.order=sweep",
                   "summary.subset_tables=[image_auroc,aupro]", f"hydra.sweep.dir={sweep}",
                   "stage=train_test", "save_model=true"], sweep, fast=False)
    assert res.code == 0, res.stderr[-2000:]
    jobs = job_dirs(sweep)  # in sweep order: masking random, saliency
    assert len(jobs) == 2
    for job in jobs:
        rows = {r["category"]: r for r in read_rows(job / "results.csv")}
        assert list(rows) == ["AeBAD_S", "AeBAD_S/same", "AeBAD_S/background",
                              "AeBAD_S/illumination", "AeBAD_S/view"]
        assert rows["AeBAD_S"]["weights"] == "random(seed=0) + teacher=random(seed=0)"
        assert rows["AeBAD_S"]["layers"] == "blocks.11 + teacher=layer1.1+layer2.1+layer3.1"
        assert all(r["pixel_auroc"] != "" for r in rows.values())
    md = (sweep / "summary.md").read_text()
    assert "## AeBAD_S: image_auroc per test subset" in md and "## AeBAD_S: aupro" in md
    assert "method.masking=random | method.masking=saliency" in md
    assert "| **mean** |" in md and "| whole test set |" in md
    # the trained encoder is in model.pt, the teacher is not; stage=test reproduces the rows
    payload = checkpoint.load(jobs[0] / "AeBAD_S" / "model.pt")
    assert not any(k.startswith("teacher.") for k in payload["state_dict"])
    test_dir = tmp_path / "test"
    res = run_cli([*TINY, "dataset=aebad_s", f"data_root={root}", "stage=test",
                   f"checkpoint={jobs[0]}"], test_dir, fast=False)
    assert res.code == 0, res.stderr[-2000:]
    before = {r["category"]: r["image_auroc"] for r in read_rows(jobs[0] / "results.csv")}
    after = {r["category"]: r["image_auroc"] for r in read_rows(test_dir / "results.csv")}
    assert before == after


def test_aebad_v_has_frame_metrics_and_no_pixel_metrics(tmp_path):
    root = write_aebad_v(tmp_path / "data")
    res = run_cli([*TINY, "dataset=aebad_v", f"data_root={root}"], tmp_path / "run",
                  fast=False)
    assert res.code == 0, res.stderr[-2000:]
    rows = {r["category"]: r for r in read_rows(tmp_path / "run" / "results.csv")}
    assert list(rows) == ["AeBAD_V", "AeBAD_V/video1", "AeBAD_V/video2", "AeBAD_V/video3"]
    for r in rows.values():
        assert r["image_auroc"] != "" and r["pixel_auroc"] == "" and r["aupro"] == ""


@pytest.mark.parametrize(("extra", "says"), [
    (["backbone=resnet18"], "backbone=resnet18 is a CNN backbone"),
    (["method.teacher=mae_vit_base"], "is a vit backbone, but MMR reconstructs"),
    (["method.mask_ratio=1.0"], "method.mask_ratio=1.0 is not allowed: expected a number > 0"),
    (["method.mask_ratio=0"], "method.mask_ratio=0 is not allowed"),
    (["method.masking=saliency", "method.saliency_split=-0.1"],
     "method.saliency_split=-0.1 is not allowed: expected a number >= 0 and <= 1"),
])
def test_bad_input_is_refused_before_any_image_is_read(tmp_path, extra, says):
    root = _corrupt_images(write_aebad_s(tmp_path / "data"))
    res = run_cli(["method=mmr", "backbone.pretrained=false", "method.teacher=resnet18",
                   "dataset=aebad_s", f"data_root={root}", *extra], tmp_path / "run",
                  fast=False)
    assert res.code == 2
    message = res.stderr.strip().splitlines()[-1]
    assert message.startswith("anomaly-bench: error: ") and says in message
    assert "Cannot read" not in res.stderr and "Traceback" not in res.stderr


def test_trained_encoder_checkpoint_for_another_teacher_is_refused(tmp_path):
    cfg = compose_config([*TINY, "dataset=aebad_s"])
    g = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in checkpoint.MODEL_KEYS}
    method = build_method(g["method"], g["backbone"], g["layers"], 0)
    meta = {"method": "mmr", "backbone": g["backbone"]["name"], "weights": method.weights_tag,
            "layers": method.layers_tag, "resolution": "64", "dataset": "aebad_s",
            "category": "AeBAD_S", "seed": 0}
    ckpt = checkpoint.save(tmp_path / "model.pt", method, g, meta)
    root = _corrupt_images(write_aebad_s(tmp_path / "data"))
    other = [a for a in TINY if not a.startswith("method.teacher=")]
    res = run_cli([*other, "method.teacher=wide_resnet50_2", "dataset=aebad_s",
                   f"data_root={root}", "stage=test", f"checkpoint={ckpt}"], tmp_path / "run",
                  fast=False)
    assert res.code == 2
    message = res.stderr.strip().splitlines()[-1]
    assert "method.teacher.name='resnet18'" in message
    assert "method.teacher.name='wide_resnet50_2'" in message
    assert "Cannot read" not in res.stderr
