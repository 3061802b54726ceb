"""model.pt is data: no code runs from it, damage is detected, a mismatch is named."""

from __future__ import annotations

import copy
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from anomaly_bench import checkpoint, datafile
from anomaly_bench.errors import CheckpointError
from anomaly_bench.methods import build_method
from anomaly_bench.types import Batch

BACKBONE = {"name": "resnet18", "hub_tag": "tv_in1k", "pretrained": False, "weights": None,
            "truncate": True, "cache": {"enabled": False, "dir": "unused"}}
LAYERS = {"layer1": -1, "layer2": -1, "layer3": None, "layer4": None}
METHOD = {"name": "padim", "n_features": 30, "reg": 0.01, "blur_sigma": 4.0, "solver": "auto",
          "input_size": 256, "input_crop": 224}
CONFIG = {"method": METHOD, "backbone": BACKBONE, "layers": LAYERS,
          "resolution": {"size": 64, "crop": None}, "alignment": {"name": "none"}}
META = {"method": "padim", "backbone": "resnet18", "weights": "random(seed=0)",
        "layers": "layer1.1+layer2.1", "resolution": "64", "dataset": "mvtec",
        "category": "bottle", "seed": 0}


def _batch(images: torch.Tensor) -> Batch:
    n = images.shape[0]
    return Batch(images=images, labels=torch.zeros(n, dtype=torch.long),
                 paths=[str(i) for i in range(n)], defect_types=["good"] * n)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(path of a saved fitted PaDiM, the model, test images)."""
    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(6, 3, 64, 64, generator=gen), torch.randn(2, 3, 64, 64, generator=gen)
    model = build_method(METHOD, BACKBONE, LAYERS, seed=0)
    model.fit([_batch(train[:3]), _batch(train[3:])])
    path = checkpoint.save(tmp_path_factory.mktemp("ckpt") / "model.pt", model, CONFIG, META)
    return path, model, test


class _Payload:
    """An object whose unpickling runs a shell command (what a crafted model.pt holds)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickled_command_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    with evil.open("wb") as fh:
        pickle.dump({"format": datafile.FORMAT, "meta": _Payload(marker)}, fh)
    torch.save({"format": datafile.FORMAT, "x": _Payload(marker)}, tmp_path / "evil2.pt")
    for path in (evil, tmp_path / "evil2.pt"):
        with pytest.raises(CheckpointError, match="cannot be read"):
            checkpoint.load(path)
    assert not marker.exists()


def test_round_trip_restores_identical_scores(saved):
    path, model, test = saved
    payload = checkpoint.load(path)
    assert payload["meta"] == META
    assert not any(k.startswith("extractor.") for k in payload["state_dict"])
    restored = checkpoint.restore(payload, path, BACKBONE, payload["config"]["method"])
    a, b = model.predict(_batch(test)), restored.predict(_batch(test))
    assert torch.equal(a.image_scores, b.image_scores)
    assert torch.equal(a.anomaly_maps, b.anomaly_maps)


def _largest_tensor_offset(path: Path, payload: dict) -> int:
    # a tensor stored in its own plain layout (the backbone's are channels-last)
    name, t = max(((k, v) for k, v in payload["state_dict"].items() if v.is_contiguous()),
                  key=lambda kv: kv[1].numel())
    data = path.read_bytes()
    at = data.find(t.numpy().tobytes()[:256])
    assert at > 0, name
    return at


def test_flipped_tensor_bytes_are_detected(saved, tmp_path):
    path, _, _ = saved
    at = _largest_tensor_offset(path, checkpoint.load(path))
    data = bytearray(path.read_bytes())
    for i in range(at + 64, at + 128):
        data[i] ^= 0xFF
    bad = tmp_path / "model.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(bad)


@pytest.mark.parametrize("cut", ["truncated", "empty", "header"])
def test_truncated_files_are_errors(saved, tmp_path, cut):
    path, _, _ = saved
    data = path.read_bytes()
    bad = tmp_path / "model.pt"
    bad.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                     "header": data[:64]}[cut])
    with pytest.raises(CheckpointError, match="cannot be read"):
        checkpoint.load(bad)


def _raw(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("drop", ["checksum", "data"])
def test_missing_entries_are_named(saved, tmp_path, drop):
    path, _, _ = saved
    payload = _raw(path)
    del payload[drop]
    torch.save(payload, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=f"incomplete.*{drop}"):
        checkpoint.load(tmp_path / "model.pt")


@pytest.mark.parametrize("drop", ["meta.category", "config.layers"])
def test_a_consistent_file_missing_a_description_key_is_named(saved, tmp_path, drop):
    path, _, _ = saved
    payload = _raw(path)
    outer, _, inner = drop.partition(".")
    del payload["description"][outer][inner]
    datafile.write_data(tmp_path / "model.pt", "model", payload["description"],
                          payload["data"])
    with pytest.raises(CheckpointError, match=f"incomplete.*{drop}"):
        checkpoint.load(tmp_path / "model.pt")


def test_changed_description_fails_the_checksum(saved, tmp_path):
    path, _, _ = saved
    payload = _raw(path)
    payload["description"]["meta"]["category"] = "screw"  # another category, same tensors
    torch.save(payload, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(tmp_path / "model.pt")


def test_other_format_or_kind_is_refused(saved, tmp_path):
    path, _, _ = saved
    payload = _raw(path)
    payload["format"] = "anomaly-bench/1"
    torch.save(payload, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="anomaly-bench/1"):
        checkpoint.load(tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"'model'.*expected.*'training'"):
        datafile.read_data(path, "training")


WANTED = {"weights": "random(seed=0)", "dataset": "mvtec", "category": "bottle"}


def test_matching_request_is_accepted_whatever_the_cache_settings(saved):
    path, _, _ = saved
    payload = checkpoint.load(path)
    config = copy.deepcopy(CONFIG)
    config["backbone"]["cache"] = {"enabled": True, "dir": "/elsewhere"}
    checkpoint.check_matches(payload, path, config, WANTED, allow_other_category=False)


@pytest.mark.parametrize(("group", "key", "value", "needle"), [
    ("method", "name", "patchcore", "method.name='padim'"),
    ("method", "reg", 0.5, "method.reg=0.01"),
    ("backbone", "name", "wide_resnet50_2", "backbone.name='resnet18'"),
    ("layers", "layer3", -1, "layers.layer3=None"),
    ("resolution", "size", 128, "resolution.size=64"),
    ("alignment", "name", "orb90", "alignment.name='none'"),
])
def test_mismatched_config_names_both_values(saved, group, key, value, needle):
    path, _, _ = saved
    config = copy.deepcopy(CONFIG)
    config[group][key] = value
    with pytest.raises(CheckpointError) as err:
        checkpoint.check_matches(checkpoint.load(path), path, config, WANTED, False)
    assert needle in str(err.value) and f"{key}={value!r}" in str(err.value)


def test_a_key_added_after_the_file_counts_with_its_default(saved):
    """A checkpoint written before ``blur_border`` existed was fitted with its default."""
    path, _, _ = saved
    payload = checkpoint.load(path)
    assert "blur_border" not in payload["config"]["method"]
    config = copy.deepcopy(CONFIG)
    config["method"]["blur_border"] = "mirror"
    checkpoint.check_matches(payload, path, config, WANTED, False)
    config["method"]["blur_border"] = "reflect"
    with pytest.raises(CheckpointError, match=re.escape("method.blur_border='mirror'")):
        checkpoint.check_matches(payload, path, config, WANTED, False)


def test_weights_dataset_and_category_are_checked(saved):
    path, _, _ = saved
    payload = checkpoint.load(path)
    for key, value in (("weights", "random(seed=1)"), ("dataset", "visa"),
                       ("category", "screw")):
        with pytest.raises(CheckpointError, match=re.escape(f"{key}={value!r}")):
            checkpoint.check_matches(payload, path, CONFIG, {**WANTED, key: value}, False)
    checkpoint.check_matches(payload, path, CONFIG, {**WANTED, "category": "screw"}, True)
    with pytest.raises(CheckpointError, match="dataset"):
        checkpoint.check_matches(payload, path, CONFIG, {**WANTED, "dataset": "visa"}, True)


def test_padim_refuses_images_of_another_grid(saved):
    _, model, _ = saved
    from anomaly_bench.errors import ConfigError

    with pytest.raises(ConfigError, match="fitted on a grid"):
        model.predict(_batch(torch.zeros(1, 3, 96, 96)))
