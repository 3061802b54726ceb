"""APRIL-GAN end to end: adapters trained on some categories' annotated test images and
tested zero-shot and few-shot on other categories and other datasets; an interrupted
training resumed to the same adapters; bad inputs refused before any image is read.

A tiny CLIP (3 blocks, 64 px, random weights) stands in for ViT-L-14-336.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from fixtures import compose_config, register_tiny_clip, write_folder, write_visa

from anomaly_bench import checkpoint
from anomaly_bench.errors import CheckpointError, ConfigError
from anomaly_bench.methods.aprilgan import AprilGan
from anomaly_bench.report.results import read_rows
from anomaly_bench.runner import Runner

from cli_helpers import make_mvtec, run_cli

pytestmark = pytest.mark.slow

TINY = ["method=aprilgan", "backbone.name=Tiny-CLIP-test", "backbone.pretrained=false",
        "backbone.image_size=null", "layers.blocks=[1,2]", "resolution.size=64",
        "method.train.epochs=2", "method.train.batch_size=4",
        "method.prompts.templates=['a photo of a {}.','a close-up photo of the {}.']",
        "device=cpu", "plots.enabled=false", "batch_size=8"]


@pytest.fixture(scope="module", autouse=True)
def tiny_clip(tmp_path_factory) -> str:
    return register_tiny_clip(tmp_path_factory.mktemp("clip_configs"))


def _run(run_dir: Path, *overrides: str) -> Path:
    Runner(compose_config([*TINY, *overrides]), run_dir).run()
    return run_dir


def _scores(run_dir: Path, category: str) -> list[float]:
    with (run_dir / category / "scores.csv").open(newline="") as fh:
        return [float(r["score"]) for r in csv.DictReader(fh)]


def test_adapters_trained_on_some_categories_detect_on_others(tmp_path, synthetic_root):
    data = [f"data_root={synthetic_root.parent}"]
    fit = _run(tmp_path / "fit", *data, "stage=train",
               "dataset.category=[stripes,rotated_part]")
    payload = checkpoint.load(fit / "model.pt")
    assert payload["meta"]["categories"] == ["stripes", "rotated_part"]
    assert payload["meta"]["category"] == "all" and not (fit / "results.csv").exists()
    assert sorted(payload["state_dict"]) == ["adapters.0.bias", "adapters.0.weight",
                                             "adapters.1.bias", "adapters.1.weight"]
    assert payload["state_dict"]["adapters.0.weight"].shape == (32, 48)  # Linear(48 -> 32)
    assert (fit / "training_state.pt").is_file()

    zero = _run(tmp_path / "zero", *data, "stage=test", f"checkpoint={fit}",
                "dataset.category=grain")
    (row,) = read_rows(zero / "results.csv")
    assert row["category"] == "grain" and row["n_test"] == "30"
    assert 0 <= float(row["image_auroc"]) <= 1 and 0 <= float(row["pixel_auroc"]) <= 1
    assert row["weights"] == "random(seed=0)" and row["layers"] == "blocks.1+blocks.2"
    zero_scores = _scores(zero, "grain")

    for k in (1, 2, 4):  # few-shot from the same adapters: k_shot is a test-time key
        few = _run(tmp_path / f"k{k}", *data, "stage=test", f"checkpoint={fit}",
                   "dataset.category=grain", f"method.k_shot={k}")
        (row,) = read_rows(few / "results.csv")
        scores = _scores(few, "grain")
        assert len(scores) == 30 and scores != zero_scores
        assert 0 <= float(row["pixel_auroc"]) <= 1
        # the official image score: 0.5 (p + min-max of the map maxima over the test set)
        assert min(scores) >= 0 and max(scores) <= 1
    per_image = _run(tmp_path / "per_image", *data, "stage=test", f"checkpoint={fit}",
                     "dataset.category=grain", "method.k_shot=4",
                     "method.image_score=per_image")
    assert _scores(per_image, "grain") != _scores(tmp_path / "k4", "grain")

    with pytest.raises(CheckpointError, match=r"learned from the annotated test images.*"
                                              r"stripes"):
        _run(tmp_path / "seen", *data, "stage=test", f"checkpoint={fit}",
             "dataset.category=[grain,stripes]")
    assert not (tmp_path / "seen").exists()


def test_trained_on_one_dataset_tested_on_every_category_of_another(tmp_path):
    mvtec = make_mvtec(tmp_path / "mvtec", categories=("bottle", "screw"))
    visa = write_visa(tmp_path / "visa")
    on_mvtec = _run(tmp_path / "fit_mvtec", "dataset=mvtec", f"dataset.root={mvtec}",
                    "stage=train", "method.stitch_rate=0.2")
    on_visa = _run(tmp_path / "fit_visa", "dataset=visa", f"dataset.root={visa}",
                   "stage=train", "method.train.epochs=3")
    to_visa = _run(tmp_path / "to_visa", "dataset=visa", f"dataset.root={visa}",
                   "stage=test", f"checkpoint={on_mvtec}", "method.stitch_rate=0.2")
    rows = read_rows(to_visa / "results.csv")
    assert [r["category"] for r in rows] == ["candle", "pcb1"]
    assert all(r["dataset"] == "visa" and r["pixel_auroc"] for r in rows)
    to_mvtec = _run(tmp_path / "to_mvtec", "dataset=mvtec", f"dataset.root={mvtec}",
                    "stage=test", f"checkpoint={on_visa}", "method.train.epochs=3")
    assert [r["category"] for r in read_rows(to_mvtec / "results.csv")] == ["bottle", "screw"]


def test_an_interrupted_training_resumes_to_the_same_adapters(tmp_path, synthetic_root,
                                                              monkeypatch):
    args = [f"data_root={synthetic_root.parent}", "stage=train",
            "dataset.category=[stripes,grain]", "method.stitch_rate=0.5",
            "method.train.epochs=2"]
    straight = checkpoint.load(_run(tmp_path / "straight", *args) / "model.pt")
    step = AprilGan.training_step
    calls = []

    def interrupted(self, batch):
        calls.append(1)
        if len(calls) == 20:  # 15 steps per epoch: midway through the second epoch
            raise KeyboardInterrupt
        return step(self, batch)

    monkeypatch.setattr(AprilGan, "training_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "resumed", *args)
    assert not (tmp_path / "resumed" / "model.pt").exists()
    monkeypatch.setattr(AprilGan, "training_step", step)
    resumed = checkpoint.load(_run(tmp_path / "resumed", *args, "resume=true") / "model.pt")
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


# ---------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A checkpoint of the tiny model trained on tiny MVTec, and copies of that dataset
    whose every image is unreadable (with and without masks): a run that reads one image
    fails with a data error instead of the expected message."""
    base = tmp_path_factory.mktemp("bad_input")
    data = make_mvtec(base / "mvtec", categories=("bottle", "screw"))
    fit = _run(base / "fit", "dataset=mvtec", f"dataset.root={data}", "stage=train",
               "dataset.category=[bottle]")
    corrupt = base / "corrupt"
    shutil.copytree(data, corrupt)
    for png in corrupt.rglob("*.png"):
        png.write_bytes(b"not an image")
    bare = write_folder(base / "bare", masks=False)  # a folder dataset without masks
    for png in bare.rglob("*.png"):
        png.write_bytes(b"not an image")
    return {"fit": fit, "corrupt": corrupt, "bare": bare}


BAD = {
    "cnn_backbone": (["backbone=resnet18", "stage=train"], "needs a CLIP backbone"),
    "cnn_stage_key": (["layers.layer2=1", "stage=train"], "selects a CNN stage"),
    "other_clip_model": (["stage=test", "backbone.name=ViT-B-16", "dataset.category=screw"],
                         "backbone.name='Tiny-CLIP-test'"),
    "other_blocks": (["stage=test", "layers.blocks=[0,2]", "dataset.category=screw"],
                     "layers.blocks=[1, 2]"),
    "other_activation": (["stage=test", "backbone.quick_gelu=true",
                          "dataset.category=screw"], "random(seed=0)+quick_gelu"),
    "no_masks": (["stage=train", "DATA=bare"], "folder has no masks for"),
    "k_shot_too_large": (["stage=test", "method.k_shot=7", "dataset.category=screw"],
                         "method.k_shot=7 asks for 7 reference images"),
    "train_test": (["stage=train_test"], "stage=train dataset=<A>"),
    "learned_categories": (["stage=test", "dataset.category=[bottle,screw]"],
                           "learned from the annotated test images of mvtec (bottle)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_paragraph_and_exit_2_before_any_image(case, trained, tmp_path):
    args, needle = BAD[case]
    data = (["dataset=folder", f"dataset.root={trained['bare']}"] if "DATA=bare" in args
            else ["dataset=mvtec", f"dataset.root={trained['corrupt']}"])
    args = [a for a in args if a != "DATA=bare"]
    if any(a == "stage=test" for a in args):
        args.append(f"checkpoint={trained['fit']}")
    tiny = [a for a in TINY if not (case == "cnn_backbone" and a.startswith("backbone."))]
    cli = [*tiny, *data, *args]
    res = run_cli(cli, tmp_path / "run", fast=False)
    assert res.code == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "Cannot read image" not in res.stderr
    message = [line for line in res.stderr.splitlines() if "anomaly-bench: error:" in line]
    assert len(message) == 1 and needle in message[0], res.stderr[-2000:]
    if case in ("other_clip_model", "k_shot_too_large", "learned_categories"):
        # the same refusal in-process, with the error type
        kind = ConfigError if case == "k_shot_too_large" else CheckpointError
        with pytest.raises(kind):
            _run(tmp_path / "inproc", *data, *args)
