"""Every config value is checked before data is read: one message naming key, value and rule."""

from __future__ import annotations

import pytest
from fixtures import compose_config, register_tiny_clip
from omegaconf import OmegaConf

from anomaly_bench.errors import ConfigError
from anomaly_bench.methods import available, method_schema
from anomaly_bench.runner import Runner
from anomaly_bench.schema import validate


def _validate(overrides: list[str]) -> None:
    cfg = compose_config(overrides)
    validate(OmegaConf.to_container(cfg, resolve=True), method_schema(cfg.method.name))


@pytest.mark.parametrize("method", available())
@pytest.mark.parametrize("extra", [[], ["resolution=native"], ["alignment=orb90"],
                                   ["dataset=stc"], ["dataset=folder"], ["dataset=aebad_s"],
                                   ["dataset=visa"],
                                   ["backbone=vit_base_patch16_224"], ["backbone=mae_vit_base"],
                                   ["backbone=clip_vit_b16_plus_240"],
                                   ["backbone=clip_vit_l14_336"]])
def test_defaults_of_every_method_and_group_are_valid(method, extra):
    _validate([f"method={method}", *extra])


@pytest.mark.parametrize("experiment", ["padim_screw_layers", "padim_screw_layers_orb90",
                                        "spade_stc", "spade_mvtec_layers", "spade_mvtec_gallery",
                                        *[f"texture_v0{i}" for i in range(1, 7)],
                                        "aprilgan_zero_shot_mvtec", "aprilgan_zero_shot_visa",
                                        "aprilgan_few_shot"])
def test_presets_are_valid(experiment):
    overrides = [f"experiment={experiment}"]
    if experiment.startswith("texture"):
        overrides.append("method=texture_knn")
    _validate(overrides)


@pytest.mark.parametrize(("overrides", "needle", "rule"), [
    (["resolution.size=abc"], "resolution.size='abc'", "an integer >= 1 or null"),
    (["batch_size=abc"], "batch_size='abc'", "an integer >= 1"),
    (["batch_size=0"], "batch_size=0", "an integer >= 1"),
    (["seed=abc"], "seed='abc'", "an integer >= 0"),
    (["method.n_features=10.5"], "method.n_features=10.5", "an integer >= 1 or null"),
    (["method.reg=0"], "method.reg=0", "a number > 0"),
    (["method.solver=exact"], "method.solver='exact'", "auto or full or lowrank"),
    (["method=patchcore", "method.projection_dim=-5"], "method.projection_dim=-5",
     "an integer >= 0 or null"),
    (["method=patchcore", "method.embed_dim=0"], "method.embed_dim=0", "an integer >= 1"),
    (["method=patchcore", "method.coreset_ratio=1.5"], "method.coreset_ratio=1.5", "<= 1"),
    (["method=spade", "method.k=0"], "method.k=0", "an integer >= 1"),
    (["method=texture_knn", "method.mode=few"], "method.mode='few'", "zero_shot or many_shot"),
    (["method=patchcore", "method.blur_border=wrap"], "method.blur_border='wrap'",
     "mirror or reflect"),
    (["plots.max_overlays=-1"], "plots.max_overlays=-1", "an integer >= 0"),
    (["memory_cache_gb=lots"], "memory_cache_gb='lots'", "auto or a number >= 0"),
    (["resume=maybe"], "resume='maybe'", "true or false"),
    (["stage=fit"], "stage='fit'", "train or test or train_test"),
    (["alignment=orb90", "alignment.ratio=2"], "alignment.ratio=2", "<= 1"),
    (["+method.typo=1"], "method.typo", "not a known key"),
    (["resolution.size=200", "resolution.crop=224"], "resolution.crop=224", "larger"),
])
def test_bad_values_name_key_value_and_rule(overrides, needle, rule):
    with pytest.raises(ConfigError) as err:
        _validate(overrides)
    assert needle in str(err.value) and rule in str(err.value), str(err.value)


def test_runner_validates_before_reading_any_data(tmp_path):
    cfg = compose_config(["batch_size=abc", f"data_root={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match="batch_size"):
        Runner(cfg, tmp_path / "run")
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", available())
def test_a_method_built_from_its_name_alone_takes_the_yaml_defaults(method, tmp_path):
    from anomaly_bench.methods import build_method
    from anomaly_bench.methods.base import method_defaults

    cfg = compose_config([f"method={method}"])
    composed = OmegaConf.to_container(cfg.method, resolve=True)
    # the YAML is the one place of defaults, resolved as composed; a key that follows
    # another group (WinCLIP's input size: the backbone's) is only known in a composed run
    raw = OmegaConf.to_container(cfg.method, resolve=False)
    outside = {k for k, v in raw.items() if isinstance(v, str) and "oc.select:backbone" in v}
    assert ({k: v for k, v in method_defaults(method).items() if k not in outside}
            == {k: v for k, v in composed.items() if k not in outside})
    backbone = {"name": "resnet18", "hub_tag": None, "pretrained": False, "weights": None}
    if cfg.backbone.get("kind") == "vit":  # a method that chooses a ViT (MMR): a tiny one
        backbone = {"name": "vit_tiny_patch16_224", "kind": "vit", "pretrained": False}
    layers = OmegaConf.to_container(cfg.layers)
    if cfg.backbone.get("kind") == "clip":  # a method that selects a CLIP tower: a tiny one
        backbone = {"name": register_tiny_clip(tmp_path), "kind": "clip", "pretrained": False,
                    "weights": None}
        layers = {"blocks": [1, 2]}
    built = build_method({"name": method}, backbone, layers, seed=0)
    for key in ("k", "reg", "blur_sigma", "coreset_ratio", "pool"):
        if key in composed and hasattr(built, key):
            assert getattr(built, key) == composed[key], key


def test_method_constructors_hold_no_defaults():
    """conf/method/<name>.yaml is the one place of defaults: the constructors take every
    setting as a required argument, so a value the YAML changes cannot be shadowed."""
    import inspect

    from anomaly_bench.methods.aprilgan import AprilGan
    from anomaly_bench.methods.padim import Padim
    from anomaly_bench.methods.patchcore import PatchCore
    from anomaly_bench.methods.spade import Spade
    from anomaly_bench.methods.texture_knn import TextureKnn

    for cls in (AprilGan, Padim, PatchCore, Spade, TextureKnn):
        params = inspect.signature(cls.__init__).parameters.values()
        with_default = [p.name for p in params if p.default is not inspect.Parameter.empty]
        assert not with_default, f"{cls.__name__}: {with_default}"


def test_aprilgan_alone_selects_its_backbone_blocks_and_input_and_the_command_line_wins():
    cfg = compose_config(["method=aprilgan"])
    assert (cfg.backbone.name, cfg.backbone.image_size, cfg.backbone.quick_gelu) == (
        "ViT-L-14-336", 518, False)
    assert list(cfg.layers.blocks) == [5, 11, 17, 23]  # layers 6, 12, 18, 24 counted from 1
    assert (cfg.resolution.size, cfg.resolution.crop) == (518, None)
    assert (cfg.method.input_resample, cfg.method.mask_resample) == ("bicubic", "bilinear")
    other = compose_config(["method=aprilgan", "backbone=clip_vit_b16_plus_240"])
    assert other.backbone.name == "ViT-B-16-plus-240" and list(other.layers.blocks) == [-1]
    chosen = compose_config(["method=aprilgan", "layers.blocks=[3,7]"])
    assert list(chosen.layers.blocks) == [3, 7] and chosen.backbone.name == "ViT-L-14-336"
    assert compose_config(["method=padim"]).backbone.name == "wide_resnet50_2"
