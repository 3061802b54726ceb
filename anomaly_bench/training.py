"""The one training loop every trained method shares: epochs, optimiser, schedule, resume.

A trained method (MMR's masked reconstruction, APRIL-GAN's adapters) implements
``training_step(batch) -> loss`` and ``trainable_parameters()``; its ``fit`` hands the
training source to :func:`train`, which owns everything around the step: the optimiser
and learning-rate schedule named by the method's ``train`` config group, optional mixed
precision, a progress bar with each epoch's loss, learning rate and images per second,
and a training state written every ``checkpoint_every`` epochs (and at the end) holding
the trained tensors, optimiser, scheduler, epoch and random-generator states. With
``resume`` an interrupted training continues from that state to the same final weights as
an uninterrupted one: each epoch's order and augmentation are drawn from generators
seeded by (seed, epoch), and the global generators are restored as they were at the end
of the saved epoch.

The state file is data, never code (see :mod:`anomaly_bench.datafile`): tensors,
numbers, strings and containers, loaded with ``weights_only=True`` and checked against
its SHA-256.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from anomaly_bench import datafile
from anomaly_bench.errors import CheckpointError
from anomaly_bench.schema import Key, one_of
from anomaly_bench.types import Batch

log = logging.getLogger("anomaly_bench")

#: The keys of a trained method's ``train`` group (types and ranges; defaults in its YAML).
TRAIN_SCHEMA: dict[str, Key] = {
    "epochs": Key(int, lo=1),
    "optimizer": one_of("adam", "adamw", "sgd"),
    "lr": Key(float, above=0),
    "betas": Key("any"),
    "momentum": Key(float, lo=0, hi=1),
    "weight_decay": Key(float, lo=0),
    "decay_1d": Key(bool),
    "schedule": one_of("constant", "cosine", "multistep"),
    "warmup_epochs": Key(int, lo=0),
    "warmup_from_zero": Key(bool),
    "milestones": Key("any"),
    "gamma": Key(float, above=0, hi=1),
    "amp": Key(bool),
    "checkpoint_every": Key(int, lo=0),
    "val_fraction": Key(float, lo=0, hi=0.9),
    "batch_size": Key(int, lo=1, null=True),  # images per training step (null = batch_size)
}


@dataclass(frozen=True)
class TrainSettings:
    """A method's ``train`` group, typed (validated by :data:`TRAIN_SCHEMA` beforehand)."""

    epochs: int
    optimizer: str
    lr: float
    betas: tuple[float, float]
    momentum: float
    weight_decay: float
    decay_1d: bool
    schedule: str
    warmup_epochs: int
    warmup_from_zero: bool
    milestones: tuple[int, ...]
    gamma: float
    amp: bool
    checkpoint_every: int

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> TrainSettings:
        return cls(
            epochs=int(cfg["epochs"]), optimizer=str(cfg["optimizer"]), lr=float(cfg["lr"]),
            betas=tuple(float(b) for b in cfg["betas"]),  # type: ignore[arg-type]
            momentum=float(cfg["momentum"]), weight_decay=float(cfg["weight_decay"]),
            decay_1d=bool(cfg["decay_1d"]), schedule=str(cfg["schedule"]),
            warmup_epochs=int(cfg["warmup_epochs"]),
            warmup_from_zero=bool(cfg["warmup_from_zero"]),
            milestones=tuple(int(m) for m in cfg["milestones"]), gamma=float(cfg["gamma"]),
            amp=bool(cfg["amp"]), checkpoint_every=int(cfg["checkpoint_every"]),
        )


class Trainable(Protocol):
    """What :func:`train` needs from a method."""

    def training_step(self, batch: Batch) -> torch.Tensor:
        """The scalar loss of one training batch (graph attached)."""
        ...

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """The parameters the optimiser updates (the frozen backbone is not among them)."""
        ...


class EpochSource(Protocol):
    """A training source that can be iterated once per epoch in a seeded order."""

    def epoch(self, index: int) -> Iterable[Batch]:
        ...

    def __len__(self) -> int:
        ...


def parameter_groups(named: list[tuple[str, nn.Parameter]], s: TrainSettings) -> list[dict]:
    """The optimiser's parameter groups: one, or with ``decay_1d=false`` a second without
    weight decay for the 1-D parameters and biases (timm's ``param_groups_weight_decay``,
    which MAE and MMR use; a class or mask token of shape (1, 1, C) is decayed)."""
    if s.decay_1d:
        return [{"params": [p for _, p in named]}]
    plain = [p for n, p in named if p.ndim <= 1 or n.endswith(".bias")]
    ids = {id(p) for p in plain}
    return [{"params": plain, "weight_decay": 0.0},
            {"params": [p for _, p in named if id(p) not in ids]}]


def make_optimizer(params: list[nn.Parameter] | list[dict],
                   s: TrainSettings) -> torch.optim.Optimizer:
    """The optimiser named by ``s.optimizer`` over ``params`` (or parameter groups)."""
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


def lr_factor(epoch: int, s: TrainSettings) -> float:
    """Multiplier of the base learning rate during ``epoch`` (0-based).

    A linear warm-up over ``warmup_epochs`` (MMR: 50 of 200; from lr 0 in the first
    epoch with ``warmup_from_zero``, as MAE's and MMR's code), then constant, a cosine
    decay to zero at the last epoch, or a step decay by ``gamma`` from each 0-based
    milestone epoch (MMR: lr/10 from 119 and 159, its epochs 120 and 160).
    """
    if epoch < s.warmup_epochs:
        return (epoch + int(not s.warmup_from_zero)) / s.warmup_epochs
    if s.schedule == "cosine":
        span = max(s.epochs - s.warmup_epochs, 1)
        return 0.5 * (1 + math.cos(math.pi * (epoch - s.warmup_epochs) / span))
    if s.schedule == "multistep":
        return s.gamma ** sum(epoch >= m for m in s.milestones)
    return 1.0


# ---------------------------------------------------------------------- generator states
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()  # noqa: NPY002 - the global generator other code uses
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss),  # noqa: NPY002
                         float(gauss)))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------- the loop
def _trained_state(method: nn.Module, params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    """The entries of ``method.state_dict()`` that training changes: the optimised
    parameters and the floating-point buffers outside the frozen backbones."""
    ids = {id(p) for p in params}
    frozen = set(getattr(method, "frozen", ()))
    return {k: v.detach().cpu().clone() for k, v in method.state_dict(keep_vars=True).items()
            if id(v) in ids or (not isinstance(v, nn.Parameter) and v.dtype.is_floating_point
                                and k.split(".", 1)[0] not in frozen)}


def train(method: nn.Module, source: EpochSource, settings: TrainSettings,
          device: torch.device, *, state_path: Path | None = None, resume: bool = False,
          description: Mapping[str, Any] | None = None, desc: str = "train") -> list[float]:
    """Run ``settings.epochs`` epochs of ``method.training_step`` over ``source``.

    Returns the mean loss of every epoch (the resumed ones included). ``state_path``
    receives the training state every ``checkpoint_every`` epochs and at the end;
    ``resume`` continues from it when it exists. ``description`` (what is being trained:
    method, backbone, dataset, ...) is stored with the state and must match on resume.
    """
    params = [p for p in method.trainable_parameters() if p.requires_grad]  # type: ignore[attr-defined]
    if not params:
        raise CheckpointError(f"{type(method).__name__} has no trainable parameters.")
    names = {id(p): n for n, p in method.named_parameters()}
    optimizer = make_optimizer(parameter_groups([(names.get(id(p), ""), p) for p in params],
                                                settings), settings)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, settings))
    use_amp = settings.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    description = dict(description or {})
    losses: list[float] = []
    start = 0
    if resume and state_path is not None and state_path.is_file():
        saved = load_state(state_path, description)
        method.load_state_dict(saved["trained"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        scaler.load_state_dict(saved["scaler"])
        _set_rng_state(saved["rng"])
        losses = [float(v) for v in saved["losses"]]
        start = int(saved["epoch"]) + 1
        log.info("%s: resumed after epoch %d of %d from %s", desc, start, settings.epochs,
                 state_path)
    method.train()
    bar = tqdm(range(start, settings.epochs), desc=desc, unit="epoch", leave=False,
               initial=start, total=settings.epochs)
    for epoch in bar:
        total = torch.zeros((), device=device)
        count = images = 0
        started = time.perf_counter()
        for batch in source.epoch(epoch):
            images += len(batch.paths)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=use_amp):
                loss = method.training_step(batch)  # type: ignore[attr-defined]
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.detach()
            count += 1
        schedule.step()
        losses.append(float(total) / max(count, 1))  # one sync per epoch
        rate = images / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(loss=f"{losses[-1]:.4g}", lr=f"{optimizer.param_groups[-1]['lr']:.3g}",
                        img_s=f"{rate:.3g}")
        last = epoch == settings.epochs - 1
        every = settings.checkpoint_every
        if state_path is not None and (last or (every and (epoch + 1) % every == 0)):
            save_state(state_path, method, params, optimizer, schedule, scaler, epoch, losses,
                       description)
    method.eval()
    return losses


def save_state(path: Path, method: nn.Module, params: list[nn.Parameter],
               optimizer: torch.optim.Optimizer, schedule: Any, scaler: Any, epoch: int,
               losses: list[float], description: Mapping[str, Any]) -> None:
    """Write the training state after ``epoch`` (atomic, checksummed)."""
    state = {"trained": _trained_state(method, params), "optimizer": optimizer.state_dict(),
             "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
             "rng": _rng_state(), "epoch": int(epoch), "losses": list(losses)}
    datafile.write_data(path, "training", dict(description), state)


def load_state(path: Path, description: Mapping[str, Any]) -> dict[str, Any]:
    """Read a training state; CheckpointError when damaged or of another training."""
    stored, state = datafile.read_data(path, "training")
    if dict(stored) != dict(description):
        diff = [k for k in sorted(set(stored) | set(description))
                if stored.get(k) != description.get(k)]
        raise CheckpointError(
            f"training state {path} belongs to another training ({', '.join(diff)} differ: "
            f"{[stored.get(k) for k in diff]} there, {[description.get(k) for k in diff]} "
            "now); remove it or run into a new directory."
        )
    return state
