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
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from anomaly_bench.errors import ConfigError
from anomaly_bench.methods.base import AnomalyMethod, register
from anomaly_bench.methods.common import build_extractor, to_image_maps
from anomaly_bench.ops.coreset import coreset_size, greedy_coreset
from anomaly_bench.ops.knn import KnnIndex
from anomaly_bench.schema import Key, one_of
from anomaly_bench.types import Batch, Prediction


@lru_cache(maxsize=16)
def _plan(channels: int, patch_size: int, pretrain_dim: int, group: int
          ) -> tuple[str, torch.Tensor | int | None]:
    """How to compute one layer's share of the embedding without unfolding it.

    The reference pools each flattened (C, p, p) neighbourhood into ``pretrain_dim`` bins
    and the Aggregator then averages ``group`` consecutive bins. Composed, every output
    value is a fixed weighted sum over the neighbourhood. When each output reads a single
    channel, the sums are one grouped convolution ("conv", weights (out, 1, p, p)); when
    each reads whole channels with equal weights, they are a channel mean then a p x p
    average pool ("channels", channels per output); otherwise ("unfold", None).
    """
    k2 = patch_size * patch_size
    length = channels * k2
    out = pretrain_dim // group
    weight = torch.zeros(out, length, dtype=torch.float64)
    for i, (start, end) in enumerate(_bins(length, pretrain_dim)):
        weight[i // group, start:end] += 1.0 / ((end - start) * group)
    per_channel = weight.view(out, channels, k2)
    touched = per_channel.abs().sum(dim=2) > 0  # (out, C)
    if out % channels == 0 and touched.sum(dim=1).eq(1).all():
        owner = touched.float().argmax(dim=1)
        if torch.equal(owner, torch.arange(out) // (out // channels)):
            kernel = per_channel[torch.arange(out), owner].view(out, 1, patch_size, patch_size)
            return "conv", kernel.float()
    if channels % out == 0:
        per = channels // out
        uniform = torch.zeros_like(weight)
        for j in range(out):
            uniform[j, j * per * k2:(j + 1) * per * k2] = 1.0 / (per * k2)
        if torch.allclose(weight, uniform, rtol=0, atol=1e-12):
            return "channels", per
    return "unfold", None


def _bins(length: int, n_bins: int) -> list[tuple[int, int]]:
    """The [start, end) ranges of ``F.adaptive_avg_pool1d(length -> n_bins)``."""
    return [((i * length) // n_bins, -((-(i + 1) * length) // n_bins)) for i in range(n_bins)]


def _layer_share(x: torch.Tensor, patch_size: int, pretrain_dim: int, group: int
                 ) -> torch.Tensor | None:
    """(B, pretrain_dim / group, h, w) for one layer by a cheap exact path, or None."""
    kind, arg = _plan(x.shape[1], patch_size, pretrain_dim, group)
    pad = (patch_size - 1) // 2
    if kind == "conv":
        assert isinstance(arg, torch.Tensor)
        return F.conv2d(x, arg.to(x.device, x.dtype), padding=pad, groups=x.shape[1])
    if kind == "channels":
        c = x.shape[1]
        assert isinstance(arg, int)
        if arg > 1:  # means of consecutive channels, kept in the channels-last layout
            x = x.permute(0, 2, 3, 1).unflatten(3, (c // arg, arg)).mean(dim=4)
            x = x.permute(0, 3, 1, 2)
        return F.avg_pool2d(x, patch_size, stride=1, padding=pad)  # zeros count, / p*p
    return None


def _mean_mapper(x: torch.Tensor, patch_size: int, pretrain_dim: int) -> torch.Tensor:
    """(B, pretrain_dim, h, w): the reference MeanMapper over unfolded neighbourhoods."""
    b, _, h, w = x.shape
    unf = F.unfold(x, kernel_size=patch_size, padding=(patch_size - 1) // 2)
    vec = F.adaptive_avg_pool1d(unf.transpose(1, 2).reshape(b * h * w, 1, -1), pretrain_dim)
    return vec.view(b, h, w, pretrain_dim).permute(0, 3, 1, 2)


def aggregate_patches(features: Mapping[str, torch.Tensor], patch_size: int, pretrain_dim: int,
                      embed_dim: int) -> torch.Tensor:
    """(B, h, w, embed_dim) locally aware patch embeddings of a feature pyramid.

    Reference order: each map's zero-padded ``patch_size`` x ``patch_size`` neighbourhoods
    are pooled to ``pretrain_dim`` values (MeanMapper), resized bilinearly to the first
    map's grid, and the concatenated layer vectors pooled to ``embed_dim`` (Aggregator).
    All of these are linear, so when the Aggregator's bins never straddle two layers both
    poolings are applied per layer before resizing (:func:`_plan`), which is exact and
    resizes and stores a fraction of the values; each layer's share is then written
    straight into its slice of the (B, h, w, D) result.
    """
    maps = list(features.values())
    b = maps[0].shape[0]
    h, w = maps[0].shape[-2:]
    length = pretrain_dim * len(maps)
    group = length // embed_dim if length % embed_dim == 0 else 0
    if group > 0 and pretrain_dim % group == 0:
        share = pretrain_dim // group
        out = torch.empty(b, h, w, share * len(maps), device=maps[0].device,
                          dtype=maps[0].dtype)
        channels = out.permute(0, 3, 1, 2)  # (B, D, h, w) view of the result
        for i, m in enumerate(maps):
            grid = _layer_share(m, patch_size, pretrain_dim, group)
            if grid is None:
                grid = _mean_mapper(m, patch_size, pretrain_dim)
                if group > 1:
                    grid = grid.view(b, -1, group, *grid.shape[-2:]).mean(dim=2)
            if tuple(grid.shape[-2:]) != (h, w):
                grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
            channels[:, i * share:(i + 1) * share].copy_(grid)
        return out
    parts = []
    for m in maps:
        grid = _mean_mapper(m, patch_size, pretrain_dim)
        if tuple(grid.shape[-2:]) != (h, w):
            grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        parts.append(grid)
    flat = torch.cat(parts, dim=1).permute(0, 2, 3, 1).reshape(-1, 1, length)
    return F.adaptive_avg_pool1d(flat, embed_dim).view(b, h, w, embed_dim)


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

    def __init__(self, extractor: torch.nn.Module, *, coreset_ratio: float,
                 projection_dim: int | None, n_starts: int, patch_size: int,
                 pretrain_dim: int, embed_dim: int, num_neighbors: int,
                 blur_sigma: float, blur_border: str, knn_backend: str, seed: int) -> None:
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
        self.blur_border = blur_border
        self.knn_backend = knn_backend
        self.seed = seed
        self.register_buffer("memory_bank", None)
        self._index: KnnIndex | None = None
        self._index_of: tuple = ()  # the memory bank the index was built from

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
        _ = self.index  # built here, so its set-up counts as training time

    def fit_bytes(self, n_images: int, shapes: Mapping[str, tuple[int, int, int]]) -> int:
        """Every training patch embedding (``embed_dim`` per position of the first
        selected feature's grid), before the coreset keeps a fraction of them."""
        _, h, w = next(iter(shapes.values()))
        return 4 * n_images * h * w * self.embed_dim

    @property
    def index(self) -> KnnIndex:
        if self.memory_bank is None:
            raise RuntimeError("PatchCore.predict called before fit")
        # a checkpoint loaded into a fitted bank is copied in place: same tensor, new version
        of = (id(self.memory_bank), self.memory_bank.data_ptr(), self.memory_bank._version)
        if self._index is None or self._index_of != of:
            self._index = KnnIndex(self.memory_bank, self.knn_backend)
            self._index_of = of
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
                                    self.blur_sigma, self.blur_border)
            scores = reweighted_scores(dist, nn_idx, flat, index, self.num_neighbors)
        return Prediction(image_scores=scores, anomaly_maps=maps)


SCHEMA = {
    "coreset_ratio": Key(float, above=0, hi=1),
    "projection_dim": Key(int, lo=0, null=True),
    "n_starts": Key(int, lo=1),
    "patch_size": Key(int, lo=1),
    "pretrain_dim": Key(int, lo=1),
    "embed_dim": Key(int, lo=1),
    "num_neighbors": Key(int, lo=1),
    "knn_backend": one_of("torch", "faiss", "auto"),
}


@register("patchcore", SCHEMA)
def _build(method_cfg: Mapping[str, Any], backbone_cfg: Mapping[str, Any],
           layers_cfg: Mapping[str, Any], seed: int) -> PatchCore:
    proj = method_cfg["projection_dim"]
    return PatchCore(
        build_extractor(backbone_cfg, layers_cfg, seed),
        coreset_ratio=float(method_cfg["coreset_ratio"]),
        projection_dim=None if proj in (None, 0) else int(proj),
        n_starts=int(method_cfg["n_starts"]),
        patch_size=int(method_cfg["patch_size"]),
        pretrain_dim=int(method_cfg["pretrain_dim"]),
        embed_dim=int(method_cfg["embed_dim"]),
        num_neighbors=int(method_cfg["num_neighbors"]),
        blur_sigma=float(method_cfg["blur_sigma"]),
        blur_border=str(method_cfg["blur_border"]),
        knn_backend=str(method_cfg["knn_backend"]),
        seed=seed,
    )
