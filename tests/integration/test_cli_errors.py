"""Bad input: one paragraph naming the file or key, exit code 2, no traceback."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_bench.backbones.weights import PROBE_TIMEOUT_S

from cli_helpers import black_hole_network, make_mvtec, network_events, run_cli, write_png


def assert_clean_error(res, *needles):
    assert res.code == 2, (res.code, res.stderr)
    assert "Traceback" not in res.stderr
    msg = res.stderr
    for needle in needles:
        assert needle in msg, msg


def test_missing_data_root(tmp_path):
    res = run_cli(["dataset=mvtec_screw", f"data_root={tmp_path / 'nowhere'}"], tmp_path / "r")
    assert_clean_error(res, str(tmp_path / "nowhere"), "ANOMALY_BENCH_DATA")


def test_wrong_layout(tmp_path):
    (tmp_path / "mvtec" / "screw" / "images").mkdir(parents=True)
    res = run_cli(["dataset=mvtec", f"dataset.root={tmp_path / 'mvtec'}"], tmp_path / "r")
    assert_clean_error(res, "train/good")


def test_unknown_category_lists_available(tmp_path):
    data = make_mvtec(tmp_path / "mvtec")
    res = run_cli(["dataset=mvtec", f"dataset.root={data}", "dataset.category=capsule"],
                  tmp_path / "r")
    assert_clean_error(res, "capsule", "bottle", "screw")


def test_truncated_image_is_named(tmp_path):
    data = make_mvtec(tmp_path / "mvtec", categories=("bottle",))
    victim = data / "bottle" / "train" / "good" / "002.png"
    victim.write_bytes(victim.read_bytes()[:200])
    res = run_cli(["dataset=mvtec", f"dataset.root={data}"], tmp_path / "r")
    assert_clean_error(res, str(victim))


def test_mask_size_mismatch_is_named(tmp_path):
    data = make_mvtec(tmp_path / "mvtec", categories=("bottle",))
    mask = data / "bottle" / "ground_truth" / "crack" / "001_mask.png"
    write_png(mask, np.zeros((20, 30), np.uint8))
    res = run_cli(["dataset=mvtec", f"dataset.root={data}"], tmp_path / "r")
    assert_clean_error(res, str(mask))


def test_bad_config_values(tmp_path):
    data = make_mvtec(tmp_path / "mvtec", categories=("bottle",))
    res = run_cli(["dataset=mvtec", f"dataset.root={data}", "layers.layer2=9"], tmp_path / "r")
    assert_clean_error(res, "layers.layer2=9")
    res = run_cli(["dataset=mvtec", f"dataset.root={data}", "stage=test"], tmp_path / "r2")
    assert_clean_error(res, "checkpoint=PATH")
    res = run_cli(["dataset=mvtec", f"dataset.root={data}", "device=cuda:7"], tmp_path / "r3")
    if res.code != 0:  # machines with 8 GPUs run it
        assert_clean_error(res, "device=cuda:7")


def test_unreachable_weights_fail_fast_with_offline_options(tmp_path):
    """One probe of the hub with the bounded time-out, then the error: no download tried."""
    data = make_mvtec(tmp_path / "mvtec", categories=("bottle",))
    net_env, log = black_hole_network(tmp_path / "net")
    res = run_cli(["dataset=mvtec", f"dataset.root={data}", "backbone=resnet18",
                   "resolution.size=64", "resolution.crop=null"], tmp_path / "r", fast=False,
                  env={"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "https://127.0.0.1:9",
                       **net_env})
    assert_clean_error(res, "backbone.weights=PATH", "backbone.pretrained=false",
                       "127.0.0.1 is not reachable")
    connects = [e for e in network_events(log) if e["event"] == "connect"]
    assert connects == [{"event": "connect", "host": "127.0.0.1", "port": 9,
                         "timeout": PROBE_TIMEOUT_S}]
    assert {e["host"] for e in network_events(log)} == {"127.0.0.1"}  # no other host looked up


@pytest.mark.slow  # a full run
def test_local_weights_file_is_used_and_recorded(tmp_path):
    import timm
    import torch

    data = make_mvtec(tmp_path / "mvtec", categories=("bottle",))
    torch.manual_seed(123)
    path = tmp_path / "resnet18-custom.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    res = run_cli(["dataset=mvtec", f"dataset.root={data}", f"backbone.weights={path}"],
                  tmp_path / "r")
    assert res.code == 0, res.stderr
    assert res.rows()[0]["weights"].startswith("file:resnet18-custom.pth#")


@pytest.mark.parametrize("override", ["method=nosuch", "dataset=nosuch"])
def test_unknown_group_option_is_rejected(tmp_path, override):
    res = run_cli([override], tmp_path / "r")
    assert res.code != 0 and "Traceback" not in res.stderr


@pytest.mark.slow
def test_a_users_meta_json_is_honoured_and_a_broken_one_refused_before_any_image(tmp_path):
    import json

    from anomaly_bench.data_cli import main as data_main

    data = make_mvtec(tmp_path / "mvtec", categories=("bottle",))
    assert data_main(["meta", "mvtec", "--root", str(data)]) == 0
    index = json.loads((data / "meta.json").read_text())
    index["train"]["bottle"] = index["train"]["bottle"][:4]
    index["test"]["bottle"] = [e for e in index["test"]["bottle"] if e["img_path"][-5] != "2"]
    (data / "meta.json").write_text(json.dumps(index))
    res = run_cli(["dataset=mvtec", f"dataset.root={data}"], tmp_path / "r")
    assert res.code == 0, res.stderr
    row = res.rows()[0]
    assert (row["n_train"], row["n_test"]) == ("4", str(len(index["test"]["bottle"])))
    index["test"]["bottle"][0]["img_path"] = "bottle/test/good/missing.png"
    (data / "meta.json").write_text(json.dumps(index))
    res = run_cli(["dataset=mvtec", f"dataset.root={data}"], tmp_path / "r2")
    assert_clean_error(res, str(data / "meta.json"), "test/bottle entry 0 img_path",
                       "does not exist")
