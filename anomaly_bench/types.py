"""Typed containers passed between datasets, methods, metrics and reports."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from anomaly_bench.memo import attach_row_keys, attached_row_keys

NORMAL = 0
ANOMALOUS = 1


@dataclass(frozen=True)
class SampleRecord:
    """One image of a dataset split as found on disk (nothing is read yet).

    ``label`` is 0 for normal and 1 for anomalous; ``mask_path`` is None for normal
    images and for datasets without pixel annotations; ``defect_type`` is the defect
    folder name (``"good"`` for normal images); ``subset`` names a test subset such as
    an AeBAD domain shift (empty when the dataset has none); ``category`` is the category
    the image belongs to (set by the runner, which mixes categories in a fit over a whole
    dataset; empty when unknown).
    """

    image_path: Path
    label: int
    defect_type: str = "good"
    mask_path: Path | None = None
    subset: str = ""
    category: str = ""


@dataclass(frozen=True)
class CategorySplit:
    """Train and test records of one category, plus whether pixel masks exist.

    ``subsets`` names the test subsets the layout reports on their own (AeBAD-S's domain
    shifts): each gets a results row besides the category's own.
    """

    dataset: str
    category: str
    root: Path
    train: list[SampleRecord]
    test: list[SampleRecord]
    has_masks: bool
    subsets: tuple[str, ...] = ()


@dataclass
class Batch:
    """A batch of preprocessed images as methods receive them.

    ``images`` are normalised float tensors (B, 3, H, W); ``masks`` are {0, 1} float
    tensors (B, 1, H, W) aligned with the images, or None when the dataset has no
    masks; ``labels`` (B,) are 0/1; ``rotations`` (B,) count the quarter turns applied by
    alignment (0 when none), so maps can be turned back for display; ``categories`` name
    each image's category (empty strings when unknown).
    """

    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    defect_types: list[str]
    masks: torch.Tensor | None = None
    rotations: torch.Tensor | None = None
    categories: list[str] = field(default_factory=list)

    def pin_memory(self) -> Batch:
        """The batch in page-locked host memory (what a DataLoader with ``pin_memory``
        calls), so that :meth:`to` a CUDA device copies asynchronously."""
        return dataclasses.replace(
            self, images=_keys_follow(self.images, self.images.pin_memory()),
            labels=self.labels.pin_memory(),
            masks=None if self.masks is None else self.masks.pin_memory())

    def to(self, device: torch.device | str) -> Batch:
        """Move the tensors to ``device`` (non-blocking where possible); content keys
        attached to the images (:func:`anomaly_bench.memo.attach_row_keys`) go with them."""
        return Batch(
            images=_keys_follow(self.images, self.images.to(device, non_blocking=True)),
            labels=self.labels.to(device, non_blocking=True),
            paths=self.paths,
            defect_types=self.defect_types,
            masks=None if self.masks is None else self.masks.to(device, non_blocking=True),
            rotations=None if self.rotations is None else self.rotations.to(device),
            categories=self.categories,
        )


def _keys_follow(source: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
    """``copy`` of ``source`` with the content keys attached to ``source``, if any."""
    keys = attached_row_keys(source)
    if keys is not None and copy is not source:
        attach_row_keys(copy, keys)
    return copy


@dataclass
class Prediction:
    """What a method returns for a batch: one score per image and a map per image.

    ``anomaly_maps`` has shape (B, H, W) at the input resolution of the batch.
    """

    image_scores: torch.Tensor
    anomaly_maps: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
