"""SPADE (Cohen & Hoshen, 2020): image retrieval, then pixel correspondences.

Image score: the mean squared Euclidean distance from the test image's global feature
(the deepest selected block, average-pooled; paper: WideResNet50-2 after layer4) to its
``k`` nearest training images' global features (paper: K = 50 on MVTec AD, 1 on STC).
Pixel score: for each pixel-level block (paper: the ends of layer1, layer2 and layer3,
equally weighted) every test position's mean squared distance to its ``kappa`` nearest
features in the gallery of all positions of the K retrieved images (kappa = 1); the
per-block maps are resized bilinearly to the image, averaged, and blurred (sigma = 4).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from anomaly_bench.errors import ConfigError
from anomaly_bench.methods.base import AnomalyMethod, register
from anomaly_bench.methods.common import build_extractor
from anomaly_bench.ops.blur import gaussian_blur
from anomaly_bench.ops.knn import knn
from anomaly_bench.schema import Key, one_of
from anomaly_bench.types import Batch, Prediction


class Spade(AnomalyMethod):
    name = "spade"

    def __init__(self, extractor: torch.nn.Module, *, k: int = 50, kappa: int = 1,
                 global_layer: str = "layer4", pixel_layers: Sequence[str] | None = None,
                 blur_sigma: float = 4.0) -> None:
        super().__init__()
        selected = list(extractor.selection)
        if global_layer not in selected:
            raise ConfigError(
                f"method.global_layer={global_layer} is not selected by layers "
                f"({extractor.tag}); set layers.{global_layer}=-1 or pick one of {selected}."
            )
        pixel = [s for s in selected if s != global_layer] if pixel_layers is None \
            else list(pixel_layers)
        missing = [s for s in pixel if s not in selected]
        if missing or not pixel:
            raise ConfigError(
                f"method.pixel_layers={pixel} must name selected stages other than nothing "
                f"(selected: {selected}); set layers.<stage>=-1 for each."
            )
        if k < 1 or kappa < 1:
            raise ConfigError(f"method.k={k} and method.kappa={kappa} must be at least 1.")
        self.extractor = extractor
        self.k, self.kappa = k, kappa
        self.global_layer = global_layer
        self.pixel_layers = pixel
        self.blur_sigma = blur_sigma
        self.register_buffer("global_bank", None)  # (N, C)
        for s in pixel:
            self.register_buffer(f"bank_{s}", None)  # (N, h, w, C)

    def _features(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            feats = self.extractor(images)
        glob = feats[self.global_layer].mean(dim=(2, 3))
        return glob, {s: feats[s].permute(0, 2, 3, 1).contiguous() for s in self.pixel_layers}

    def fit(self, batches: Iterable[Batch]) -> None:
        globs: list[torch.Tensor] = []
        maps: dict[str, list[torch.Tensor]] = {s: [] for s in self.pixel_layers}
        for batch in batches:
            g, m = self._features(batch.images)
            globs.append(g)
            for s in self.pixel_layers:
                maps[s].append(m[s])
        if not globs:
            raise ConfigError("SPADE needs training images; the training set is empty.")
        self.global_bank = torch.cat(globs)
        for s in self.pixel_layers:
            setattr(self, f"bank_{s}", torch.cat(maps[s]))

    def predict(self, batch: Batch) -> Prediction:
        if self.global_bank is None:
            raise RuntimeError("SPADE.predict called before fit")
        size = tuple(batch.images.shape[-2:])
        glob, maps = self._features(batch.images)
        k = min(self.k, self.global_bank.shape[0])
        with torch.no_grad():
            near = knn(glob, self.global_bank, k)
            scores = near.distances.square().mean(dim=1)
            total = torch.zeros(glob.shape[0], 1, *size, device=glob.device)
            for s in self.pixel_layers:
                bank: torch.Tensor = getattr(self, f"bank_{s}")
                per_image = []
                for i in range(glob.shape[0]):  # each test image has its own gallery
                    gallery = bank[near.indices[i]].reshape(-1, bank.shape[-1])
                    query = maps[s][i].reshape(-1, bank.shape[-1])
                    kk = min(self.kappa, gallery.shape[0])
                    d = knn(query, gallery, kk).distances.square().mean(dim=1)
                    per_image.append(d.view(maps[s].shape[1:3]))
                layer_map = torch.stack(per_image).unsqueeze(1)
                total += F.interpolate(layer_map, size=size, mode="bilinear",
                                       align_corners=False)
            total /= len(self.pixel_layers)
            anomaly_maps = gaussian_blur(total, self.blur_sigma).squeeze(1)
        return Prediction(image_scores=scores, anomaly_maps=anomaly_maps)


SCHEMA = {
    "k": Key(int, lo=1),
    "kappa": Key(int, lo=1),
    "global_layer": one_of("layer1", "layer2", "layer3", "layer4"),
    "pixel_layers": Key("names", null=True),
}


@register("spade", SCHEMA)
def _build(method_cfg: Mapping[str, Any], backbone_cfg: Mapping[str, Any],
           layers_cfg: Mapping[str, Any], seed: int) -> Spade:
    pixel = method_cfg.get("pixel_layers")
    return Spade(
        build_extractor(backbone_cfg, layers_cfg, seed),
        k=int(method_cfg.get("k", 50)),
        kappa=int(method_cfg.get("kappa", 1)),
        global_layer=str(method_cfg.get("global_layer", "layer4")),
        pixel_layers=None if pixel is None else [str(p) for p in pixel],
        blur_sigma=float(method_cfg.get("blur_sigma", 4.0)),
    )
