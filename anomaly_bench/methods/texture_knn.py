"""Zero-shot texture anomaly detection by in-image kNN (Aota et al., WACV 2023).

A texture repeats itself, so a normal patch has many similar patches elsewhere in the same
image, and a defect has few. Patch features are the output of WideResNet50-2 layer2,
averaged over each 3x3 neighbourhood; a patch's score is its mean Euclidean distance to
its ``k`` nearest patches *elsewhere in the same image* (K = 400 at 320 px input). The
score map is resized bilinearly to the image and blurred (sigma = 4); the image score
alpha(I) is its maximum over the interior, ``border`` pixels in from the edge, where zero
padding makes every CNN feature look unusual.

``mode=many_shot`` scores each patch against the patches of the training images instead
(mean distance to the ``k`` nearest), the paper's many-shot baseline.

``impl=reference`` computes the same numbers the straightforward way the original code
does (explicit pairwise differences and a full sort per patch, chunked); ``impl=fast`` uses
one matrix product and a partial top-k. The version ablation of the source document
compares them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from anomaly_bench.errors import ConfigError
from anomaly_bench.methods.base import AnomalyMethod, register
from anomaly_bench.methods.common import build_extractor
from anomaly_bench.ops.blur import gaussian_blur
from anomaly_bench.ops.knn import knn, self_knn_mean
from anomaly_bench.schema import Key, one_of
from anomaly_bench.types import Batch, Prediction

MODES = ("zero_shot", "many_shot")
IMPLS = ("fast", "reference")


def self_knn_mean_reference(x: torch.Tensor, k: int, max_bytes: int = 256 * 2**20
                            ) -> torch.Tensor:
    """:func:`~anomaly_bench.ops.knn.self_knn_mean` computed naively (differences + sort),
    in row chunks whose (B, rows, P, C) difference tensor stays under ``max_bytes``."""
    b, p, c = x.shape
    rows = max(1, max_bytes // (b * p * c * x.element_size()))
    out = torch.empty(b, p, device=x.device, dtype=x.dtype)
    for r0 in range(0, p, rows):
        q = x[:, r0:r0 + rows]
        d = (q.unsqueeze(2) - x.unsqueeze(1)).norm(dim=-1)  # (B, rows, P)
        r = torch.arange(q.shape[1], device=x.device)
        d[:, r, r + r0] = float("inf")
        out[:, r0:r0 + rows] = d.sort(dim=2).values[..., :k].mean(dim=2)
    return out


class TextureKnn(AnomalyMethod):
    name = "texture_knn"

    def __init__(self, extractor: torch.nn.Module, *, mode: str, k: int, pool: int,
                 border: int, impl: str, blur_sigma: float, blur_border: str) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"method.mode={mode} is not one of {', '.join(MODES)}.")
        if impl not in IMPLS:
            raise ConfigError(f"method.impl={impl} is not one of {', '.join(IMPLS)}.")
        if k < 1 or pool < 1 or pool % 2 == 0 or border < 0:
            raise ConfigError(f"method.k={k} must be >= 1, method.pool={pool} a positive odd "
                              f"number and method.border={border} >= 0.")
        if len(extractor.selection) != 1:
            raise ConfigError(f"texture_knn uses one block; layers selects {extractor.tag}.")
        self.extractor = extractor
        self.mode, self.k, self.pool, self.border, self.impl = mode, k, pool, border, impl
        self.blur_sigma = blur_sigma
        self.blur_border = blur_border
        self.register_buffer("bank", None)  # many_shot: (N, C) training patch features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) locally averaged patch features."""
        with torch.no_grad():
            f = next(iter(self.extractor(images).values()))
            if self.pool > 1:  # pooling runs about 4x faster in the channels-last layout
                f = F.avg_pool2d(f.contiguous(memory_format=torch.channels_last), self.pool,
                                 stride=1, padding=self.pool // 2)
        return f

    def fit_bytes(self, n_images: int, shapes: Mapping[str, tuple[int, int, int]]) -> int:
        """many_shot: the bank of every training patch feature (zero_shot keeps none)."""
        c, h, w = next(iter(shapes.values()))
        return 0 if self.zero_shot else 4 * n_images * c * h * w

    def fit(self, batches: Iterable[Batch]) -> None:
        if self.mode == "zero_shot":
            return
        parts = [self.features(b.images).permute(0, 2, 3, 1).flatten(0, 2) for b in batches]
        if not parts:
            raise ConfigError("texture_knn mode=many_shot needs training images.")
        self.bank = torch.cat(parts)

    def patch_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, h, w) kNN scores of (B, C, h, w) features."""
        b, c, h, w = feats.shape
        x = feats.flatten(2).transpose(1, 2).contiguous()  # (B, P, C)
        if self.mode == "zero_shot":
            k = min(self.k, h * w - 1)
            fn = self_knn_mean if self.impl == "fast" else self_knn_mean_reference
            return fn(x, k).view(b, h, w)
        if self.bank is None:
            raise RuntimeError("texture_knn many_shot predict called before fit")
        k = min(self.k, self.bank.shape[0])
        if self.impl == "fast":
            # 400 averaged neighbours: the product-form distances (see ops/knn.py)
            d = knn(x.reshape(-1, c), self.bank, k, remeasure=False).distances
        else:
            q = x.reshape(-1, c)
            d = torch.cat([torch.cdist(q[i:i + 256], self.bank).sort(dim=1).values[:, :k]
                           for i in range(0, q.shape[0], 256)])
        return d.mean(dim=1).view(b, h, w)

    def predict(self, batch: Batch) -> Prediction:
        size = tuple(batch.images.shape[-2:])
        with torch.no_grad():
            scores = self.patch_scores(self.features(batch.images))
            maps = F.interpolate(scores.unsqueeze(1), size=size, mode="bilinear",
                                 align_corners=False)
            maps = gaussian_blur(maps, self.blur_sigma, self.blur_border).squeeze(1)
            e = min(self.border, (min(size) - 1) // 2)
            inner = maps[:, e:size[0] - e, e:size[1] - e] if e else maps
            image_scores = inner.flatten(1).amax(dim=1)
        return Prediction(image_scores=image_scores, anomaly_maps=maps)


SCHEMA = {
    "mode": one_of(*MODES),
    "k": Key(int, lo=1),
    "pool": Key(int, lo=1),
    "border": Key(int, lo=0),
    "impl": one_of(*IMPLS),
}


@register("texture_knn", SCHEMA,
          learning=lambda cfg: "zero_shot" if cfg["mode"] == "zero_shot" else "one_class")
def _build(method_cfg: Mapping[str, Any], backbone_cfg: Mapping[str, Any],
           layers_cfg: Mapping[str, Any], seed: int) -> TextureKnn:
    return TextureKnn(
        build_extractor(backbone_cfg, layers_cfg, seed),
        mode=str(method_cfg["mode"]),
        k=int(method_cfg["k"]),
        pool=int(method_cfg["pool"]),
        border=int(method_cfg["border"]),
        impl=str(method_cfg["impl"]),
        blur_sigma=float(method_cfg["blur_sigma"]),
        blur_border=str(method_cfg["blur_border"]),
    )
