"""PaDiM (Defard et al., 2020): a Gaussian per patch position over CNN features.

Features of the selected blocks (paper: WideResNet50-2 layer1-3) are upsampled to the
finest grid and concatenated; a seeded random subset of ``d`` channels is kept (550 for
WRN50, 100 for ResNet18). Each position gets a Gaussian with covariance + 0.01 I; a test
patch's score is its Mahalanobis distance; the map is upsampled bilinearly to the image,
blurred with sigma = 4 and its maximum is the image score.

Two exact solvers give the same distances. ``full`` streams the training set into running
means and scatter matrices and inverts one C x C covariance per position. ``lowrank``
keeps the N centred training embeddings and applies the Woodbury identity, which is far
cheaper whenever N < C (every MVTec AD category has fewer than 550 training images). Its
statistics are kept per selected block on that block's own grid, so a coarse block
upsampled 4x costs a quarter, and the concatenated (P, N, C) embedding never exists.
``auto`` collects embeddings while N <= C and switches to streaming beyond that, so memory
never exceeds the C x C x P of the full solver.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from anomaly_bench.backbones.base import Features
from anomaly_bench.errors import ConfigError
from anomaly_bench.memo import Derived, derive, known
from anomaly_bench.methods.base import AnomalyMethod, register
from anomaly_bench.methods.common import (
    build_extractor,
    concat_pyramid,
    split_channels,
    to_image_maps,
)
from anomaly_bench.ops.gaussian import (
    GaussianAccumulator,
    level_cross,
    level_stats,
    lowrank_distance,
    mahalanobis,
    whitening,
)
from anomaly_bench.schema import Key, one_of
from anomaly_bench.types import Batch, Prediction

#: Channel counts kept by the paper per backbone; others keep at most this many.
PAPER_DIMS = {"wide_resnet50_2": 550, "resnet18": 100}
DEFAULT_MAX_DIM = 550


class Padim(AnomalyMethod):
    name = "padim"
    fixed_grid = True

    def __init__(self, extractor: torch.nn.Module, n_features: int | None, reg: float,
                 blur_sigma: float, seed: int, solver: str, *, blur_border: str) -> None:
        super().__init__()
        self.extractor = extractor
        total = sum(extractor.channels.values())
        if n_features is None:
            n_features = min(total, PAPER_DIMS.get(extractor.name, DEFAULT_MAX_DIM))
        if not 0 < n_features <= total:
            raise ConfigError(
                f"method.n_features={n_features} must be in 1..{total} (the channels of "
                f"{extractor.tag} on {extractor.name})."
            )
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(total, generator=gen)[:n_features].sort().values
        self.register_buffer("channel_idx", idx)
        self.stages = list(extractor.channels)
        local = split_channels(idx, list(extractor.channels.values()))
        # the backbone gives only these channels (and its cache keeps only them in memory)
        extractor.read_only(dict(zip(self.stages, local, strict=True)))
        #: channels kept per stage
        self.widths = {stage: int(i.numel()) for stage, i in zip(self.stages, local, strict=True)}
        if solver not in ("auto", "full", "lowrank"):
            raise ConfigError(f"method.solver={solver} is not one of auto, full, lowrank.")
        self.solver = solver
        self.register_buffer("mean", None)  # full solver: (C, P)
        self.register_buffer("inv_cov", None)  # full solver: (P, C, C)
        for stage in self.stages:  # lowrank solver, per stage on its own grid
            self.register_buffer(f"mean_{stage}", None)  # (p, c) float64
            self.register_buffer(f"centred_{stage}", None)  # (p, N, c) float64
        self.register_buffer("whiten", None)  # lowrank solver: (P, N, N) float64
        #: per stage, the fitted (mean, centred) as derived by ``fit`` (named by their inputs)
        self._fitted: dict[str, Derived[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.reg = reg
        self.blur_sigma = blur_sigma
        self.blur_border = blur_border

    def _chosen(self, feats: Features) -> list[Derived[torch.Tensor]]:
        """Per stage: the chosen channels of its block (all the backbone gives), in the
        channels-last layout the statistics read (a C-vector per position)."""
        return [feats.lazy(s) for s in self.stages]

    def _features(self, images: torch.Tensor) -> Features:
        with torch.no_grad():
            return self.extractor(images)

    def _concat(self, parts: list[Derived[torch.Tensor]]) -> torch.Tensor:
        return concat_pyramid(dict(zip(self.stages, (p.value for p in parts), strict=True)))

    def fit(self, batches: Iterable[Batch]) -> None:
        acc: GaussianAccumulator | None = GaussianAccumulator() if self.solver == "full" else None
        kept: list[list[Derived[torch.Tensor]]] = []
        shapes: list[tuple[int, int]] = []
        n = 0
        for batch in batches:
            feats = self._features(batch.images)
            parts = self._chosen(feats)
            shapes = [tuple(feats[s].shape[-2:]) for s in self.stages]
            n += batch.images.shape[0]
            if acc is None and not self._full_solver(n):
                kept.append(parts)
                continue
            if acc is None:  # auto: more samples than channels, stream from here on
                acc = GaussianAccumulator()
                for k in kept:
                    acc.update(self._concat(k).flatten(2))
                kept = []
            acc.update(self._concat(parts).flatten(2))
        self.mean = self.inv_cov = self.whiten = None
        self._fitted = {}
        for stage in self.stages:
            setattr(self, f"mean_{stage}", None)
            setattr(self, f"centred_{stage}", None)
        with torch.no_grad():
            if acc is not None:
                self.mean, self.inv_cov = acc.finalize(self.reg)
                return
            if not kept:
                raise ConfigError("PaDiM needs training images; the training set is empty.")
            if n < 2:
                raise ConfigError(f"PaDiM needs at least two training images; got {n}.")
            grams = []
            for i, stage in enumerate(self.stages):
                stats = derive("padim.level_stats", level_stats, [k[i] for k in kept])
                mean, centred, gram = stats.value
                setattr(self, f"mean_{stage}", mean)
                setattr(self, f"centred_{stage}", centred)
                self._fitted[stage] = known((mean, centred), stats.key)
                grams.append(gram)
            kept.clear()
            self.whiten = whitening(grams, shapes, shapes[0], self.reg)

    def _full_solver(self, n_images: int) -> bool:
        """Whether fitting on ``n_images`` uses the full C x C covariances (``auto``: more
        samples than channels) rather than the low-rank solver."""
        return self.solver == "full" or (self.solver == "auto"
                                          and n_images > self.channel_idx.numel())

    def fit_bytes(self, n_images: int, shapes: Mapping[str, tuple[int, int, int]]) -> int:
        """The full solver's C x C covariance per position of the finest grid, or the
        low-rank solver's N centred embeddings per stage and N x N whitening per position."""
        d = int(self.channel_idx.numel())
        grid = [shapes[s][1] * shapes[s][2] for s in self.stages]
        if self._full_solver(n_images):
            return 4 * grid[0] * d * d
        kept = sum(self.widths[s] * p for s, p in zip(self.stages, grid, strict=True))
        return 4 * n_images * kept + 4 * grid[0] * n_images * n_images

    def memo_bytes(self, n_fit: int, n_test: int,
                   shapes: Mapping[str, tuple[int, int, int]]) -> int:
        """The low-rank solver's float64 shares per stage (:func:`level_stats`: mean,
        centred samples and Gram matrices; :func:`level_cross` of the test images)."""
        if self._full_solver(n_fit):
            return super().memo_bytes(n_fit, n_test, shapes)
        total = 0
        for s in self.stages:
            c, p = self.widths[s], shapes[s][1] * shapes[s][2]
            total += 8 * p * (c * (n_fit + 1) + n_fit * n_fit + n_test * (n_fit + 1))
        return total

    def _statistics(self, stage: str) -> Derived[tuple[torch.Tensor, torch.Tensor]]:
        """The fitted (mean, centred samples) of one stage, named as derived by ``fit``."""
        fitted = self._fitted.get(stage)
        if fitted is None:  # loaded from a checkpoint
            fitted = known((self.get_buffer(f"mean_{stage}"), self.get_buffer(f"centred_{stage}")))
        return fitted

    def predict(self, batch: Batch) -> Prediction:
        if self.inv_cov is None and self.whiten is None:
            raise RuntimeError("PaDiM.predict called before fit")
        with torch.no_grad():
            feats = self._features(batch.images)
            parts = self._chosen(feats)
            b = batch.images.shape[0]
            shapes = [tuple(feats[s].shape[-2:]) for s in self.stages]
            h, w = shapes[0]
            fitted = (self.mean.shape[1] if self.mean is not None
                      else self.get_buffer(f"mean_{self.stages[0]}").shape[0])
            if h * w != fitted:
                raise ConfigError(
                    f"PaDiM was fitted on a grid of {fitted} feature positions but images of "
                    f"{tuple(batch.images.shape[-2:])} px give {h}x{w}: test images must have "
                    "the size the model was fitted at (set resolution.size)."
                )
            if self.inv_cov is not None:
                dist = mahalanobis(self._concat(parts).flatten(2), self.mean, self.inv_cov)
            else:
                cross, sq = [], []
                for stage, part in zip(self.stages, parts, strict=True):
                    c, q = derive("padim.level_cross", _level_cross, part,
                                  self._statistics(stage)).value
                    cross.append(c)
                    sq.append(q)
                dist = lowrank_distance(cross, sq, shapes, self.whiten, (h, w), self.reg)
                dist = dist.to(feats[self.stages[0]].dtype)
            dist = dist.view(b, h, w)
            scores, maps = to_image_maps(dist, tuple(batch.images.shape[-2:]), self.blur_sigma,
                                         self.blur_border)
        return Prediction(image_scores=scores, anomaly_maps=maps)


def _level_cross(features: torch.Tensor, fitted: tuple[torch.Tensor, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return level_cross(features, *fitted)


SCHEMA = {
    "n_features": Key(int, lo=1, null=True),
    "reg": Key(float, above=0),
    "solver": one_of("auto", "full", "lowrank"),
}


@register("padim", SCHEMA)
def _build(method_cfg: Mapping[str, Any], backbone_cfg: Mapping[str, Any],
           layers_cfg: Mapping[str, Any], seed: int) -> Padim:
    extractor = build_extractor(backbone_cfg, layers_cfg, seed)
    n = method_cfg["n_features"]
    return Padim(extractor, None if n is None else int(n), float(method_cfg["reg"]),
                 float(method_cfg["blur_sigma"]), seed, str(method_cfg["solver"]),
                 blur_border=str(method_cfg["blur_border"]))

