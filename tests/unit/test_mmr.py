"""MMR on random-initialised tiny networks: schedule, parameter groups, positions, what a
checkpoint holds, and an interrupted training resumed to the same final weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import compose_config, preprocess, write_aebad_s
from omegaconf import OmegaConf

from anomaly_bench import checkpoint
from anomaly_bench.data import get_layout, make_loader
from anomaly_bench.data.source import TrainSource
from anomaly_bench.methods import MethodContext, build_method, requested_weights
from anomaly_bench.methods.mmr import sincos_position_embedding
from anomaly_bench.training import TrainSettings, lr_factor, parameter_groups

TINY = ["method=mmr", "backbone.name=vit_tiny_patch16_224", "backbone.weights_url=null",
        "backbone.pretrained=false", "method.teacher=resnet18", "resolution.size=64",
        "resolution.crop=null"]


def _groups(overrides=()):
    cfg = compose_config([*TINY, *overrides])
    return {k: OmegaConf.to_container(cfg[k], resolve=True)
            for k in ("method", "backbone", "layers", "resolution", "alignment")}


def _build(overrides=()):
    g = _groups(overrides)
    return build_method(g["method"], g["backbone"], g["layers"], 0), g


def test_official_schedule_and_parameter_groups():
    method, g = _build()
    s = TrainSettings.from_config(g["method"]["train"] | {"epochs": 200})
    # lr * epoch / 50 in warm-up (epoch 0 at lr 0), then lr/10 from 0-based 119 and 159
    assert [lr_factor(e, s) for e in (0, 1, 49, 50, 118)] == [0, 1 / 50, 49 / 50, 1, 1]
    assert lr_factor(119, s) == pytest.approx(0.1) and lr_factor(158, s) == pytest.approx(0.1)
    assert lr_factor(159, s) == pytest.approx(0.01) and lr_factor(199, s) == pytest.approx(0.01)
    named = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    plain, decayed = parameter_groups(named, s)
    names = {id(p): n for n, p in named}
    no_decay = {names[id(p)] for p in plain["params"]}
    decay = {names[id(p)] for p in decayed["params"]}
    assert plain["weight_decay"] == 0.0
    assert {"mask_token", "encoder.model.cls_token"} <= decay  # (1, 1, C): decayed
    assert all(n.endswith(".bias") or method.get_parameter(n).ndim == 1 for n in no_decay)
    assert "encoder.model.blocks.0.norm1.weight" in no_decay
    assert "encoder.model.pos_embed" not in decay | no_decay  # fixed sin-cos
    assert not any(n.startswith("teacher.") for n in decay | no_decay)


def _mae_sincos(dim: int, size: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed (official repository), in NumPy float64."""
    grid = np.stack(np.meshgrid(np.arange(size, dtype=np.float64),
                                np.arange(size, dtype=np.float64)), axis=0)

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(dim // 2, grid[0]), one(dim // 2, grid[1])], axis=1)


def test_position_embedding_is_maes_sincos():
    ours = sincos_position_embedding(192, 14, 14).numpy()
    np.testing.assert_allclose(ours, _mae_sincos(192, 14).astype(np.float32), atol=1e-6)
    method, _ = _build()  # a random encoder starts from the same fixed embedding
    pos = method.encoder.model.pos_embed[0]
    assert torch.equal(pos[0], torch.zeros(192))
    np.testing.assert_allclose(pos[1:].detach().numpy(), _mae_sincos(192, 14), atol=1e-6)


def test_weights_tags_name_every_network():
    method, g = _build()
    assert method.weights_tag == "random(seed=0) + teacher=random(seed=0)"
    assert requested_weights(g["method"], g["backbone"], 0) == method.weights_tag
    assert method.layers_tag == "blocks.11 + teacher=layer1.1+layer2.1+layer3.1"
    assert method.frozen == ("teacher",) and method.normalisation[0] == (0.485, 0.456, 0.406)
    # backbone.pretrained=false reaches the teacher too (its option says pretrained: true)
    assert g["method"]["teacher"]["pretrained"] is True
    assert "teacher=random(seed=0)" in requested_weights(g["method"], g["backbone"], 0)


def test_checkpoint_holds_the_trained_encoder_and_never_the_teacher(tmp_path):
    method, g = _build()
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))  # as if trained
    meta = {"method": "mmr", "backbone": g["backbone"]["name"], "weights": method.weights_tag,
            "layers": method.layers_tag, "resolution": "64", "dataset": "aebad_s",
            "category": "AeBAD_S", "seed": 0}
    path = checkpoint.save(tmp_path / "model.pt", method, g, meta)
    payload = checkpoint.load(path)
    keys = list(payload["state_dict"])
    assert any(k.startswith("encoder.model.blocks.") for k in keys) and "mask_token" in keys
    assert not any(k.startswith("teacher.") for k in keys)
    restored = checkpoint.restore(payload, path, g["backbone"], g["method"])
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    from anomaly_bench.types import Batch

    batch = Batch(images=images, labels=torch.zeros(2), paths=["a", "b"],
                  defect_types=["good", "good"])
    a, b = method.eval().predict(batch), restored.eval().predict(batch)
    assert torch.equal(a.anomaly_maps, b.anomaly_maps)


class _Stop:
    """The source, stopping (as Ctrl-C would) when epoch ``at`` begins."""

    def __init__(self, source: TrainSource, at: int | None) -> None:
        self.source, self.at = source, at
        self.seen: list[int] = []

    def __len__(self) -> int:
        return len(self.source)

    def epoch(self, index: int):
        self.seen.append(index)
        if index == self.at:
            raise KeyboardInterrupt
        return self.source.epoch(index)


def _fit(root: Path, out: Path, stop: int | None) -> tuple[dict[str, torch.Tensor], list[int]]:
    method, _ = _build(["method.masking=saliency", "method.epochs=3",
                        "method.train.warmup_epochs=1", "method.train.checkpoint_every=1"])
    split = get_layout("aebad_s").split(root, "AeBAD_S")
    pre = preprocess(64, None)

    def batches(records, what, view=None):
        return iter(make_loader(records, pre.__class__(None, None, pre.mean, pre.std,
                                                       "bilinear", "nearest"),
                                3, with_masks=False, transform_pil=view))

    view = method.train_view.__class__(64, method.train_view.scale, method.train_view.ratio,
                                       method.train_view.resample, method.train_view.flip)
    source = TrainSource(split.train, batches, seed=0, view=view)
    torch.manual_seed(0)  # the runner seeds every fit
    method.setup(MethodContext(dataset="aebad_s", category="AeBAD_S", class_name="blade",
                               references=None, device=torch.device("cpu"), seed=0,
                               out_dir=out, resume=True))
    stopping = _Stop(source, stop)
    method.fit(stopping)
    return {k: v.clone() for k, v in method.fitted_state().items()}, stopping.seen


@pytest.mark.slow
def test_interrupted_training_resumes_to_the_same_final_weights(tmp_path):
    root = write_aebad_s(tmp_path / "data")
    straight, _ = _fit(root, tmp_path / "a", None)
    with pytest.raises(KeyboardInterrupt):
        _fit(root, tmp_path / "b", 2)  # training state written after epochs 1 and 2 of 3
    torch.manual_seed(123)  # whatever the process did since, the state restores its own
    resumed, seen = _fit(root, tmp_path / "b", None)
    assert seen == [2]  # only the last epoch ran again
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    fresh = _build()[0].fitted_state()
    assert not torch.equal(fresh["mask_token"], straight["mask_token"])  # it did train


def test_teacher_sees_its_own_normalisation():
    method, _ = _build(["backbone.mean=[0.5,0.5,0.5]", "backbone.std=[0.5,0.5,0.5]"])
    assert method.normalisation == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    raw = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    got = method.teacher_features((raw - 0.5) / 0.5)
    with torch.no_grad():
        want = method.teacher((raw - mean) / std)
    for g, name in zip(got, ("layer1", "layer2", "layer3"), strict=True):
        torch.testing.assert_close(g, want[name], atol=1e-5, rtol=1e-4)
