"""The training images of a category as a re-iterable source of batches.

A frozen-feature method reads its training set once, in dataset order: ``iter(source)``.
A trained method reads it once per epoch: ``source.epoch(e)`` visits the same images in
an order drawn from a generator seeded by (seed, e), and passes each batch through the
``augment`` hook with that generator, so epoch ``e`` is the same whether the training
ran straight through or was resumed before it. A ``view`` (a random geometry the method
sees its training images through, :mod:`anomaly_bench.data.views`) is drawn from the same
generator, per image, and applied as each image is read. ``val_fraction`` holds out a seeded part
of the images (``source.validation()``), which the epochs never see. ``choose(k)`` is a
seeded choice of ``k`` images (the references of a few-shot method).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from anomaly_bench.data.views import DrawnViews, TrainView
from anomaly_bench.errors import ConfigError
from anomaly_bench.types import Batch, SampleRecord

#: ``batches(records, what)``: the records as device batches, in the given order.
BatchMaker = Callable[[list[SampleRecord], str], Iterator[Batch]]
#: ``augment(batch, generator)``: a training batch transformed with draws from generator.
Augment = Callable[[Batch, torch.Generator], Batch]
#: ``batches(records, what, view=...)``: with a view, the images of ``records`` are read
#: through it (:class:`~anomaly_bench.data.views.DrawnViews`).


def _generator(*keys: int) -> torch.Generator:
    """A torch generator seeded from several integers (NumPy's SeedSequence mixes them)."""
    seed = int(np.random.SeedSequence([int(k) % 2**63 for k in keys]).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


@dataclass
class TrainSource:
    """Seeded epochs, an optional validation split and an augmentation hook over records."""

    records: list[SampleRecord]
    batches: BatchMaker
    seed: int = 0
    val_fraction: float = 0.0
    augment: Augment | None = None
    view: TrainView | None = None
    train_records: list[SampleRecord] = field(init=False)
    val_records: list[SampleRecord] = field(init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in [0, 1).")
        n_val = round(len(self.records) * self.val_fraction)
        held = set(torch.randperm(len(self.records), generator=_generator(self.seed, -1))
                   [:n_val].tolist())
        self.train_records = [r for i, r in enumerate(self.records) if i not in held]
        self.val_records = [r for i, r in enumerate(self.records) if i in held]

    def __len__(self) -> int:
        return len(self.train_records)

    def __iter__(self) -> Iterator[Batch]:
        """One pass over the training images in dataset order, without augmentation."""
        return self.batches(self.train_records, "fit")

    def epoch(self, index: int) -> Iterator[Batch]:
        """Epoch ``index`` (0-based): a seeded order and seeded augmentation."""
        gen = _generator(self.seed, index)
        order = torch.randperm(len(self.train_records), generator=gen).tolist()
        records = [self.train_records[i] for i in order]
        what = f"epoch {index + 1}"
        if self.view is None:
            batches = self.batches(records, what)
        else:
            draws = torch.rand(len(records), self.view.n_draws, generator=gen,
                               dtype=torch.float64).tolist()
            batches = self.batches(records, what,  # type: ignore[call-arg]
                                   view=DrawnViews(self.view, dict(zip(records, draws,
                                                                       strict=True))))
        for batch in batches:
            yield self.augment(batch, gen) if self.augment is not None else batch

    def validation(self) -> Iterator[Batch]:
        """The held-out images in dataset order (nothing when ``val_fraction`` is 0)."""
        return self.batches(self.val_records, "validate")

    def choose(self, k: int) -> TrainSource:
        """A source over a seeded choice of ``k`` training images (few-shot references)."""
        if not 1 <= k <= len(self.train_records):
            raise ConfigError(
                f"method.k_shot={k} must be between 1 and the {len(self.train_records)} "
                "training images of the category."
            )
        pick = sorted(torch.randperm(len(self.train_records),
                                     generator=_generator(self.seed, -2))[:k].tolist())
        return TrainSource([self.train_records[i] for i in pick], self.batches, self.seed,
                           0.0, self.augment, self.view)
