"""method=winclip through the command: zero- and few-shot runs, its defaults, bad input."""

from __future__ import annotations

import csv
import math

import pytest
from fixtures import compose_config

from cli_helpers import make_mvtec, run_cli, tiny_clip_env
from test_cli_errors import assert_clean_error

pytestmark = pytest.mark.slow  # full runs of the command


def test_winclip_zero_and_few_shot_end_to_end(tmp_path, synthetic_root):
    env, tiny = tiny_clip_env(tmp_path / "clip")
    common = ["method=winclip", *tiny, "dataset=synthetic", f"dataset.root={synthetic_root}",
              "dataset.category=[stripes,rotated_part]", "plots.max_overlays=2"]
    zero = run_cli(common, tmp_path / "zero", fast=False, env=env)
    assert zero.code == 0, zero.stderr[-2000:]
    few = run_cli([*common, "method.k_shot=2"], tmp_path / "few", fast=False, env=env)
    assert few.code == 0, few.stderr[-2000:]
    for res, n_train in ((zero, "0"), (few, "2")):
        rows = res.rows()
        assert [r["category"] for r in rows] == ["stripes", "rotated_part"]
        for row in rows:
            assert row["method"] == "winclip" and row["backbone"] == "Tiny-CLIP-test"
            assert row["weights"] == "random(seed=0)" and row["layers"] == "blocks.2"
            assert row["resolution"] == "64" and row["n_train"] == n_train
            for col in ("image_auroc", "pixel_auroc", "aupro"):
                assert 0 <= float(row[col]) <= 1, (col, row[col])
            scores = res.rows(f"{row['category']}/scores.csv")
            assert len(scores) == int(row["n_test"])
            assert all(math.isfinite(float(s["score"])) for s in scores)
    # the references change the scores
    assert zero.rows("stripes/scores.csv") != few.rows("stripes/scores.csv")


def test_winclip_alone_selects_its_backbone_and_the_command_line_wins():
    cfg = compose_config(["method=winclip"])
    assert (cfg.backbone.name, cfg.backbone.hub_tag, cfg.backbone.image_size) == (
        "ViT-B-16-plus-240", "laion400m_e31", 240)
    assert list(cfg.layers.blocks) == [-1] and cfg.resolution.size == 240
    assert cfg.resolution.crop is None and cfg.method.input_resample == "bicubic"
    other = compose_config(["method=winclip", "backbone=clip_vit_l14_336"])
    assert other.backbone.name == "ViT-L-14-336" and other.resolution.size == 518
    assert list(other.layers.blocks) == [5, 11, 17, 23]
    assert compose_config(["backbone=clip_vit_l14_336", "method=winclip"]).backbone.name \
        == "ViT-L-14-336"  # the order of the arguments does not matter
    assert compose_config(["method=winclip", "backbone=resnet18"]).backbone.name == "resnet18"


@pytest.mark.parametrize(("overrides", "needles"), [
    (["layers.layer3=2"], ["layers.layer3=2 selects a CNN stage", "layers.blocks"]),
    (["backbone=resnet18"], ["method=winclip", "choose a CLIP backbone"]),
    (["method.k_shot=7"], ["method.k_shot=7", "6 training images", "k_shot <= 6"]),
])
def test_bad_input_stops_before_any_image_is_read(tmp_path, overrides, needles):
    env, tiny = tiny_clip_env(tmp_path / "clip")
    data = make_mvtec(tmp_path / "mvtec", categories=("bottle",))
    for image in data.rglob("*.png"):  # reading any image would fail on it
        image.write_bytes(b"not an image")
    args = ["method=winclip", *tiny, "dataset=mvtec", f"dataset.root={data}", *overrides]
    if overrides == ["backbone=resnet18"]:
        args = ["method=winclip", "backbone=resnet18", "backbone.pretrained=false",
                "dataset=mvtec", f"dataset.root={data}"]
    res = run_cli(args, tmp_path / "run", fast=False, env=env)
    assert_clean_error(res, *needles)
    assert len([line for line in res.stderr.strip().splitlines() if line.strip()]) <= 3


def test_few_shot_preset_sweeps_k_1_2_4(tmp_path, synthetic_root):
    env, tiny = tiny_clip_env(tmp_path / "clip")
    sweep = tmp_path / "sweep"
    res = run_cli(["-m", "experiment=winclip_few_shot", *tiny, "dataset=synthetic",
                   f"dataset.root={synthetic_root}", "dataset.category=stripes",
                   "plots.enabled=false", f"hydra.sweep.dir={sweep}"],
                  tmp_path / "unused", fast=False, env=env)
    assert res.code == 0, res.stderr[-2000:]
    with (sweep / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["overrides"].split("method.k_shot=")[1].split()[0] for r in rows] == ["1", "2", "4"]
    assert [r["n_train"] for r in rows] == ["1", "2", "4"]
    assert {r["method"] for r in rows} == {"winclip"}
