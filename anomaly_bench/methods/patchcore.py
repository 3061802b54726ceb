"""PatchCore (Roth et al., CVPR 2022): a coreset memory bank of locally aware patch features.

Embedding, as in the paper and its official code: the selected blocks (paper:
WideResNet50-2 layer2 + layer3) are each aggregated over a 3x3 neighbourhood of every
position (zero padded), each flattened (channel, 3, 3) neighbourhood is average-pooled to
``pretrain_dim`` values, deeper maps are resized bilinearly to the finest grid, and the
layers' vectors are concatenated and average-pooled to ``embed_dim`` (1024). Pooling over
channels and bilinear resizing are both linear and act on different axes, so pooling
happens before resizing here: the same numbers for a ninth of the resizing work.

Fit keeps a greedy k-center coreset (default 10%, selected on a 128-d random projection)
of all training patch embeddings. A test patch's score is its exact Euclidean distance to
the nearest bank entry; the map is resized bilinearly to the image and blurred with
sigma = 4. The image score is the maximum patch score reweighted as in the paper's eq. 7:
``s = (1 - softmax(-)_0) * s*`` over the distances from the most anomalous test patch to
its nearest bank entry ``m*`` and to ``m*``'s ``num_neighbors`` nearest bank entries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from anomaly_bench.errors import ConfigError
from anomaly_bench.methods.base import AnomalyMethod, register
from anomaly_bench.methods.common import build_extractor, to_image_maps
from anomaly_bench.ops.coreset import coreset_size, greedy_coreset
from anomaly_bench.ops.knn import KnnIndex
from anomaly_bench.types import Batch, Prediction


def aggregate_patches(features: Mapping[str, torch.Tensor], patch_size: int, pretrain_dim: int,
                      embed_dim: int) -> torch.Tensor:
    """(B, h, w, embed_dim) locally aware patch embeddings of a feature pyramid.

    Each map (B, C, h_l, w_l) is unfolded into ``patch_size`` x ``patch_size``
    neighbourhoods, each neighbourhood's (C, p, p) values pooled to ``pretrain_dim``
    (adaptive average pooling, as the reference ``MeanMapper``), resized bilinearly to the
    first map's grid, and the concatenated layer vectors pooled to ``embed_dim``.
    """
    maps = list(features.values())
    b = maps[0].shape[0]
    h, w = maps[0].shape[-2:]
    pad = (patch_size - 1) // 2
    pooled = []
    for m in maps:
        hl, wl = m.shape[-2:]
        unf = F.unfold(m, kernel_size=patch_size, padding=pad)  # (B, C*p*p, hl*wl)
        vec = F.adaptive_avg_pool1d(unf.transpose(1, 2).reshape(-1, 1, unf.shape[1]),
                                    pretrain_dim)  # (B*hl*wl, 1, pretrain_dim)
        grid = vec.view(b, hl, wl, pretrain_dim).permute(0, 3, 1, 2)
        if (hl, wl) != (h, w):
            grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        pooled.append(grid.permute(0, 2, 3, 1))  # (B, h, w, pretrain_dim)
    stacked = torch.cat(pooled, dim=-1).reshape(-1, 1, pretrain_dim * len(maps))
    return F.adaptive_avg_pool1d(stacked, embed_dim).view(b, h, w, embed_dim)


def reweighted_scores(patch_scores: torch.Tensor, nn_index: torch.Tensor,
                      embeddings: torch.Tensor, index: KnnIndex, num_neighbors: int
                      ) -> torch.Tensor:
    """Image scores of PatchCore's eq. 7 from (B, P) patch scores and nearest bank indices.

    ``embeddings`` (B, P, D) are the test patch embeddings; ``index`` holds the bank.
    """
    bank = index.bank
    rows = torch.arange(patch_scores.shape[0], device=patch_scores.device)
    worst = patch_scores.argmax(dim=1)
    s_star = patch_scores[rows, worst]
    if num_neighbors <= 1:
        return s_star
    m_test = embeddings[rows, worst]  # (B, D)
    m_star = bank[nn_index[rows, worst]]  # (B, D)
    support = index.search(m_star, min(num_neighbors, bank.shape[0])).indices.to(bank.device)
    dist = (bank[support] - m_test.unsqueeze(1)).norm(dim=-1)  # (B, b)
    weight = 1.0 - torch.softmax(dist, dim=1)[:, 0]
    return weight * s_star


class PatchCore(AnomalyMethod):
    name = "patchcore"

    def __init__(self, extractor: torch.nn.Module, *, coreset_ratio: float = 0.1,
                 projection_dim: int | None = 128, n_starts: int = 10, patch_size: int = 3,
                 pretrain_dim: int = 1024, embed_dim: int = 1024, num_neighbors: int = 9,
                 blur_sigma: float = 4.0, knn_backend: str = "torch", seed: int = 0) -> None:
        super().__init__()
        if not 0 < coreset_ratio <= 1:
            raise ConfigError(f"method.coreset_ratio={coreset_ratio} must be in (0, 1].")
        if patch_size < 1 or patch_size % 2 == 0:
            raise ConfigError(f"method.patch_size={patch_size} must be a positive odd number.")
        if knn_backend not in ("torch", "faiss", "auto"):
            raise ConfigError(f"method.knn_backend={knn_backend} is not one of torch, faiss.")
        self.extractor = extractor
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.n_starts = n_starts
        self.patch_size = patch_size
        self.pretrain_dim = pretrain_dim
        self.embed_dim = embed_dim
        self.num_neighbors = num_neighbors
        self.blur_sigma = blur_sigma
        self.knn_backend = knn_backend
        self.seed = seed
        self.register_buffer("memory_bank", None)
        self._index: KnnIndex | None = None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) patch embeddings of a batch of images."""
        with torch.no_grad():
            return aggregate_patches(self.extractor(images), self.patch_size,
                                     self.pretrain_dim, self.embed_dim)

    def fit(self, batches: Iterable[Batch]) -> None:
        parts = [self.embed(batch.images).flatten(0, 2) for batch in batches]
        if not parts:
            raise ConfigError("PatchCore needs training images; the training set is empty.")
        features = torch.cat(parts)
        parts.clear()
        n = coreset_size(features.shape[0], self.coreset_ratio)
        if n < features.shape[0]:
            idx = greedy_coreset(features, n, projection_dim=self.projection_dim,
                                 n_starts=self.n_starts, seed=self.seed, progress=True)
            features = features[idx]
        self.memory_bank = features.contiguous()
        self._index = None

    @property
    def index(self) -> KnnIndex:
        if self.memory_bank is None:
            raise RuntimeError("PatchCore.predict called before fit")
        if self._index is None or self._index.bank is not self.memory_bank:
            self._index = KnnIndex(self.memory_bank, self.knn_backend)
        return self._index

    def predict(self, batch: Batch) -> Prediction:
        index = self.index
        with torch.no_grad():
            emb = self.embed(batch.images)
            b, h, w, d = emb.shape
            flat = emb.reshape(b, h * w, d)
            nn = index.search(flat.reshape(-1, d), 1)
            dist = nn.distances.to(emb.device).view(b, h * w)
            nn_idx = nn.indices.to(emb.device).view(b, h * w)
            _, maps = to_image_maps(dist.view(b, h, w), tuple(batch.images.shape[-2:]),
                                    self.blur_sigma)
            scores = reweighted_scores(dist, nn_idx, flat, index, self.num_neighbors)
        return Prediction(image_scores=scores, anomaly_maps=maps)


@register("patchcore")
def _build(method_cfg: Mapping[str, Any], backbone_cfg: Mapping[str, Any],
           layers_cfg: Mapping[str, Any], seed: int) -> PatchCore:
    proj = method_cfg.get("projection_dim", 128)
    return PatchCore(
        build_extractor(backbone_cfg, layers_cfg, seed),
        coreset_ratio=float(method_cfg.get("coreset_ratio", 0.1)),
        projection_dim=None if proj in (None, 0) else int(proj),
        n_starts=int(method_cfg.get("n_starts", 10)),
        patch_size=int(method_cfg.get("patch_size", 3)),
        pretrain_dim=int(method_cfg.get("pretrain_dim", 1024)),
        embed_dim=int(method_cfg.get("embed_dim", 1024)),
        num_neighbors=int(method_cfg.get("num_neighbors", 9)),
        blur_sigma=float(method_cfg.get("blur_sigma", 4.0)),
        knn_backend=str(method_cfg.get("knn_backend", "torch")),
        seed=seed,
    )
