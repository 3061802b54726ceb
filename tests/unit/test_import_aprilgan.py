"""The official APRIL-GAN adapters file (train.py's {"trainable_linearlayer": ...}) as a
model.pt: names and shapes checked, the preset's configuration, tensors only."""

from __future__ import annotations

import pickle

import pytest
import torch
from fixtures import compose_config, register_tiny_clip
from omegaconf import OmegaConf

from anomaly_bench import checkpoint
from anomaly_bench.errors import CheckpointError
from anomaly_bench.import_aprilgan import OFFICIAL_CATEGORIES, convert, main

TINY = ["backbone.name=Tiny-CLIP-test", "backbone.pretrained=false", "backbone.image_size=null",
        "layers.blocks=[1,2]", "resolution.size=64"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return register_tiny_clip(tmp_path_factory.mktemp("clip_configs"))


def _official(path, shapes=((32, 48), (32,)), n=2, key="trainable_linearlayer"):
    gen = torch.Generator().manual_seed(0)
    state = {f"fc.{i}.{p}": torch.randn(shape, generator=gen)
             for i in range(n) for p, shape in zip(("weight", "bias"), shapes, strict=True)}
    torch.save({key: state}, path)
    return state


def test_the_adapters_become_a_model_for_the_preset_that_tests_them(tiny, tmp_path):
    state = _official(tmp_path / "mvtec_pretrained.pth")
    out = convert(tmp_path / "mvtec_pretrained.pth", tmp_path / "out" / "model.pt", "mvtec",
                  TINY)
    payload = checkpoint.load(out)
    meta = payload["meta"]
    assert meta["dataset"] == "mvtec" and meta["category"] == "all"
    assert meta["categories"] == list(OFFICIAL_CATEGORIES["mvtec"])
    assert len(meta["categories"]) == 15
    assert meta["layers"] == "blocks.1+blocks.2" and meta["weights"] == "random(seed=0)"
    # the configuration of experiment=aprilgan_zero_shot_visa: MVTec's training settings
    cfg = compose_config(["experiment=aprilgan_zero_shot_visa", *TINY])
    model_cfg = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in checkpoint.MODEL_KEYS}
    assert payload["config"]["method"]["stitch_rate"] == 0.2
    assert payload["config"]["method"]["train"]["epochs"] == 3
    checkpoint.check_matches(payload, out, model_cfg, {"weights": "random(seed=0)"}, True, True)
    with pytest.raises(CheckpointError, match="learned from the annotated test images"):
        checkpoint.check_unseen(payload, out, "mvtec", ["bottle"])
    checkpoint.check_unseen(payload, out, "visa", ["candle"])  # another dataset: allowed
    method = checkpoint.restore(payload, out, model_cfg["backbone"], model_cfg["method"])
    for i in range(2):
        assert torch.equal(method.adapters[i].weight, state[f"fc.{i}.weight"])
        assert torch.equal(method.adapters[i].bias, state[f"fc.{i}.bias"])


def test_other_shapes_names_and_objects_are_refused(tiny, tmp_path):
    _official(tmp_path / "wide.pth", shapes=((32, 64), (32,)))
    with pytest.raises(CheckpointError, match=r"needs 2 of Linear\(48, 32\)"):
        convert(tmp_path / "wide.pth", tmp_path / "a.pt", "visa", TINY)
    _official(tmp_path / "three.pth", n=3)
    with pytest.raises(CheckpointError, match="holds 3 adapters"):
        convert(tmp_path / "three.pth", tmp_path / "b.pt", "visa", TINY)
    _official(tmp_path / "other.pth", key="model")
    with pytest.raises(CheckpointError, match="not an official APRIL-GAN adapters file"):
        convert(tmp_path / "other.pth", tmp_path / "c.pt", "visa", TINY)
    (tmp_path / "code.pth").write_bytes(pickle.dumps(_Marker()))
    with pytest.raises(CheckpointError, match="never loaded"):
        convert(tmp_path / "code.pth", tmp_path / "d.pt", "visa", TINY)
    assert not _Marker.built  # nothing from the file was constructed
    assert not any((tmp_path / n).exists() for n in ("a.pt", "b.pt", "c.pt", "d.pt"))


def test_command_line_exit_codes(tiny, tmp_path, capsys):
    _official(tmp_path / "visa_pretrained.pth")
    assert main([str(tmp_path / "visa_pretrained.pth"), str(tmp_path / "m.pt"),
                 "--trained-on", "visa", *TINY]) == 0
    assert "experiment=aprilgan_zero_shot_mvtec" in capsys.readouterr().out
    assert main([str(tmp_path / "missing.pth"), str(tmp_path / "n.pt"), "--trained-on",
                 "visa", *TINY]) == 2
    assert "no such file" in capsys.readouterr().err


class _Marker:
    built = False

    def __reduce__(self):
        return (_Marker._build, ())

    @staticmethod
    def _build():
        _Marker.built = True
        return {}
