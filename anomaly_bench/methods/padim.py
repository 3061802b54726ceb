"""PaDiM (Defard et al., 2020): a Gaussian per patch position over CNN features.

Features of the selected blocks (paper: WideResNet50-2 layer1-3) are upsampled to the
finest grid and concatenated; a seeded random subset of ``d`` channels is kept (550 for
WRN50, 100 for ResNet18). Each position gets a Gaussian with covariance + 0.01 I; a test
patch's score is its Mahalanobis distance; the map is upsampled bilinearly to the image,
blurred with sigma = 4 and its maximum is the image score.

Two exact solvers give the same distances. ``full`` streams the training set into running
means and scatter matrices and inverts one C x C covariance per position. ``lowrank``
keeps the N centred training embeddings and applies the Woodbury identity, which is far
cheaper whenever N < C (every MVTec AD category has fewer than 550 training images).
``auto`` collects embeddings while N <= C and switches to streaming beyond that, so memory
never exceeds the C x C x P of the full solver.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from anomaly_bench.errors import ConfigError
from anomaly_bench.methods.base import AnomalyMethod, register
from anomaly_bench.methods.common import build_extractor, concat_pyramid, to_image_maps
from anomaly_bench.ops.gaussian import (
    GaussianAccumulator,
    lowrank_fit,
    lowrank_mahalanobis,
    mahalanobis,
)
from anomaly_bench.types import Batch, Prediction

#: Channel counts kept by the paper per backbone; others keep at most this many.
PAPER_DIMS = {"wide_resnet50_2": 550, "resnet18": 100}
DEFAULT_MAX_DIM = 550


class Padim(AnomalyMethod):
    name = "padim"

    def __init__(self, extractor: torch.nn.Module, n_features: int | None, reg: float = 0.01,
                 blur_sigma: float = 4.0, seed: int = 0, solver: str = "auto") -> None:
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
        if solver not in ("auto", "full", "lowrank"):
            raise ConfigError(f"method.solver={solver} is not one of auto, full, lowrank.")
        self.solver = solver
        self.register_buffer("mean", None)
        self.register_buffer("inv_cov", None)  # full solver: (P, C, C)
        self.register_buffer("centred", None)  # lowrank solver: (P, N, C)
        self.register_buffer("chol", None)  # lowrank solver: (P, N, N) float64
        self.reg = reg
        self.blur_sigma = blur_sigma

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w) embedding: concatenated pyramid restricted to the chosen channels."""
        with torch.no_grad():
            return concat_pyramid(self.extractor(images), self.channel_idx)

    def fit(self, batches: Iterable[Batch]) -> None:
        dim = int(self.channel_idx.numel())
        acc: GaussianAccumulator | None = GaussianAccumulator() if self.solver == "full" else None
        kept: list[torch.Tensor] = []
        n = 0
        for batch in batches:
            emb = self.embed(batch.images).flatten(2)
            n += emb.shape[0]
            if acc is None and (self.solver == "lowrank" or n <= dim):
                kept.append(emb)
                continue
            if acc is None:  # auto: more samples than channels, stream from here on
                acc = GaussianAccumulator()
                for e in kept:
                    acc.update(e)
                kept = []
            acc.update(emb)
        self.mean = self.inv_cov = self.centred = self.chol = None
        with torch.no_grad():
            if acc is not None:
                self.mean, self.inv_cov = acc.finalize(self.reg)
            else:
                embeddings = torch.cat(kept)
                kept.clear()
                self.mean, self.centred, self.chol = lowrank_fit(embeddings, self.reg)

    def predict(self, batch: Batch) -> Prediction:
        if self.mean is None:
            raise RuntimeError("PaDiM.predict called before fit")
        with torch.no_grad():
            emb = self.embed(batch.images)
            b, _, h, w = emb.shape
            if self.inv_cov is not None:
                dist = mahalanobis(emb.flatten(2), self.mean, self.inv_cov)
            else:
                dist = lowrank_mahalanobis(emb.flatten(2), self.mean, self.centred, self.chol,
                                           self.reg)
            dist = dist.view(b, h, w)
            scores, maps = to_image_maps(dist, tuple(batch.images.shape[-2:]), self.blur_sigma)
        return Prediction(image_scores=scores, anomaly_maps=maps)


@register("padim")
def _build(method_cfg: Mapping[str, Any], backbone_cfg: Mapping[str, Any],
           layers_cfg: Mapping[str, Any], seed: int) -> Padim:
    extractor = build_extractor(backbone_cfg, layers_cfg, seed)
    return Padim(extractor, method_cfg.get("n_features"), float(method_cfg.get("reg", 0.01)),
                 float(method_cfg.get("blur_sigma", 4.0)), seed,
                 str(method_cfg.get("solver", "auto")))

