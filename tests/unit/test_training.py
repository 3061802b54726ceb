"""The shared training loop, the re-iterable training source and the method lifecycle.

A tiny trainable method (a convolutional autoencoder with dropout, scoring reconstruction
error) exercises what MMR and APRIL-GAN will use: seeded epochs, optimiser and schedule,
the training state written every N epochs, and resume to the same final weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from anomaly_bench.data.source import TrainSource
from anomaly_bench.errors import CheckpointError, ConfigError
from anomaly_bench.methods import AnomalyMethod, MethodContext
from anomaly_bench.training import TrainSettings, lr_factor, train
from anomaly_bench.types import Batch, Prediction, SampleRecord

SETTINGS = {"epochs": 6, "optimizer": "adamw", "lr": 3e-3, "betas": [0.9, 0.95],
            "momentum": 0.0, "weight_decay": 0.05, "decay_1d": True, "schedule": "multistep",
            "warmup_epochs": 2, "warmup_from_zero": False,
            "milestones": [4], "gamma": 0.1, "amp": False, "checkpoint_every": 2}


def _records(n: int) -> list[SampleRecord]:
    return [SampleRecord(Path(f"img{i:02d}.png"), 0) for i in range(n)]


def _make_batches(batch_size: int = 4):
    """A batch maker that renders each record as a fixed random 16x16 image."""
    def batches(records: list[SampleRecord], what: str):
        for i in range(0, len(records), batch_size):
            chunk = records[i : i + batch_size]
            images = torch.stack([
                torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(
                    int(r.image_path.stem[3:]))) for r in chunk])
            yield Batch(images=images, labels=torch.zeros(len(chunk), dtype=torch.long),
                        paths=[str(r.image_path) for r in chunk],
                        defect_types=["good"] * len(chunk))
    return batches


class TinyAutoencoder(AnomalyMethod):
    """Reconstructs its input; the anomaly map is the squared reconstruction error."""

    name = "tiny_autoencoder"

    def __init__(self, settings: dict, stop_at_epoch: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Conv2d(8, 3, 3, padding=1))
        self.settings = TrainSettings.from_config(settings)
        self.stop_at_epoch = stop_at_epoch
        self.seen_epochs: list[int] = []
        self.losses: list[float] = []

    def trainable_parameters(self):
        return self.net.parameters()

    def training_step(self, batch: Batch) -> torch.Tensor:
        return ((self.net(batch.images) - batch.images) ** 2).mean()

    def fit(self, source: TrainSource) -> None:
        ctx = self.context
        self.losses = train(self, _Interrupting(source, self), self.settings, ctx.device,
                            state_path=ctx.out_dir / "train_state.pt", resume=ctx.resume,
                            description={"method": self.name, "category": ctx.category})

    def predict(self, batch: Batch) -> Prediction:
        with torch.no_grad():
            maps = ((self.net(batch.images) - batch.images) ** 2).mean(1)
        return Prediction(image_scores=maps.flatten(1).amax(1), anomaly_maps=maps)


class _Interrupting:
    """The source, raising KeyboardInterrupt when the method's stop epoch begins."""

    def __init__(self, source: TrainSource, method: TinyAutoencoder) -> None:
        self.source, self.method = source, method

    def __len__(self) -> int:
        return len(self.source)

    def epoch(self, index: int):
        self.method.seen_epochs.append(index)
        if index == self.method.stop_at_epoch:
            raise KeyboardInterrupt
        return self.source.epoch(index)


def _context(out_dir: Path, resume: bool) -> MethodContext:
    return MethodContext(dataset="synthetic", category="grain", class_name="grain",
                         references=None, device=torch.device("cpu"), seed=0,
                         out_dir=out_dir, resume=resume)


def _fit(out_dir: Path, resume: bool, stop_at_epoch: int | None = None,
         settings: dict = SETTINGS) -> TinyAutoencoder:
    method = TinyAutoencoder(settings, stop_at_epoch)
    method.setup(_context(out_dir, resume))
    method.fit(TrainSource(_records(10), _make_batches(), seed=0))
    return method


def test_training_lowers_the_loss_and_leaves_eval_mode(tmp_path):
    method = _fit(tmp_path, resume=False)
    assert len(method.losses) == 6 and method.losses[-1] < 0.8 * method.losses[0]
    assert all(b < a for a, b in zip(method.losses, method.losses[1:], strict=False))
    assert not method.training
    assert (tmp_path / "train_state.pt").is_file()


def test_resume_continues_to_the_same_final_weights(tmp_path):
    straight = _fit(tmp_path / "a", resume=False)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "b", resume=True, stop_at_epoch=3)  # state saved after epoch 2 of 6
    resumed = _fit(tmp_path / "b", resume=True)
    assert resumed.seen_epochs == [2, 3, 4, 5]  # epochs 0-1 came from the saved state
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    assert resumed.losses == straight.losses


def test_resume_without_state_starts_over_and_without_resume_ignores_it(tmp_path):
    first = _fit(tmp_path, resume=True)
    assert first.seen_epochs == list(range(6))
    again = _fit(tmp_path, resume=False)
    assert again.seen_epochs == list(range(6))


def test_a_damaged_or_foreign_training_state_is_an_error(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, resume=True, stop_at_epoch=3)
    state = tmp_path / "train_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train_state.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        _fit(tmp_path / "bad", resume=True)
    method = TinyAutoencoder(SETTINGS)
    method.setup(MethodContext(dataset="synthetic", category="stripes", class_name="stripes",
                               references=None, device=torch.device("cpu"), seed=0,
                               out_dir=tmp_path, resume=True))
    with pytest.raises(CheckpointError, match="another training"):
        method.fit(TrainSource(_records(10), _make_batches(), seed=0))


def test_learning_rate_schedule_follows_warmup_and_steps():
    mmr = TrainSettings.from_config({**SETTINGS, "epochs": 200, "warmup_epochs": 50,
                                     "milestones": [120, 160]})
    assert lr_factor(0, mmr) == pytest.approx(1 / 50) and lr_factor(49, mmr) == 1.0
    assert lr_factor(119, mmr) == 1.0 and lr_factor(120, mmr) == pytest.approx(0.1)
    assert lr_factor(160, mmr) == pytest.approx(0.01)
    cosine = TrainSettings.from_config({**SETTINGS, "schedule": "cosine", "warmup_epochs": 0,
                                        "epochs": 10})
    assert lr_factor(0, cosine) == 1.0 and lr_factor(5, cosine) == pytest.approx(0.5)


def _order(source: TrainSource, epoch: int) -> list[str]:
    return [p for b in source.epoch(epoch) for p in b.paths]


def test_epochs_are_seeded_shuffles_of_the_training_images():
    a = TrainSource(_records(12), _make_batches(), seed=3)
    b = TrainSource(_records(12), _make_batches(), seed=3)
    assert _order(a, 0) == _order(b, 0) and _order(a, 1) == _order(b, 1)
    assert _order(a, 0) != _order(a, 1)
    assert sorted(_order(a, 0)) == sorted(p for batch in a for p in batch.paths)
    assert [p for batch in a for p in batch.paths] == [f"img{i:02d}.png" for i in range(12)]
    assert _order(TrainSource(_records(12), _make_batches(), seed=4), 0) != _order(a, 0)


def test_validation_split_and_few_shot_choice_are_seeded_and_disjoint():
    src = TrainSource(_records(20), _make_batches(), seed=1, val_fraction=0.25)
    train_paths = {str(r.image_path) for r in src.train_records}
    val_paths = [p for b in src.validation() for p in b.paths]
    assert len(val_paths) == 5 and len(src) == 15 and not train_paths & set(val_paths)
    assert set(_order(src, 0)) == train_paths
    again = TrainSource(_records(20), _make_batches(), seed=1, val_fraction=0.25)
    assert again.val_records == src.val_records
    refs = src.choose(4)
    assert len(refs) == 4 and refs.train_records == again.choose(4).train_records
    assert {str(r.image_path) for r in refs.train_records} <= train_paths
    with pytest.raises(ConfigError, match="k_shot=16"):
        src.choose(16)


def test_augmentation_hook_gets_the_epoch_generator():
    seen = []

    def augment(batch: Batch, gen: torch.Generator) -> Batch:
        noise = torch.rand(1, generator=gen).item()
        seen.append(noise)
        batch.images = batch.images + noise
        return batch

    src = TrainSource(_records(8), _make_batches(), seed=0, augment=augment)
    first = [b.images.clone() for b in src.epoch(0)]
    draws = list(seen)
    seen.clear()
    second = [b.images.clone() for b in src.epoch(0)]
    assert seen == draws and all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    plain = [b.images for b in src]  # one ordered pass: no augmentation
    assert seen == draws and len(plain) == 2
