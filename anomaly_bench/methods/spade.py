"""SPADE (Cohen & Hoshen, 2020): image retrieval, then pixel correspondences.

Image score: the mean squared Euclidean distance from the test image's global feature
(the deepest selected block, average-pooled; paper: WideResNet50-2 after layer4) to its
``k`` nearest training images' global features (paper: K = 50 on MVTec AD, 1 on STC).
Pixel score: for each pixel-level block (paper: the ends of layer1, layer2 and layer3,
equally weighted) every test position's mean squared distance to its ``kappa`` nearest
features in the gallery of all positions of the K retrieved images (kappa = 1); the
per-block maps are resized bilinearly to the image, averaged, and blurred (sigma = 4).

Any backbone kind works: ``global_layer`` and ``pixel_layers`` name the extractor's
selected features, ``layer1`` .. ``layer4`` on a CNN, ``block<i>`` for the transformer
blocks ``layers.blocks`` selects on a ViT or CLIP tower. ``global_layer: null`` (the
default) is the deepest selected feature: layer4 with SPADE's CNN layers (the paper), the
last of ``layers.blocks`` on a transformer.

``gallery=random`` replaces the K retrieved images by K training images drawn at random
per test image (the paper's Table 7 ablation; seeded by the run seed, drawn in test
order); the image score stays the retrieval's.

The pixel search is exact. With kappa = 1 and enough work to pay off, each block's bank
is prepared once (after fit, or on first use after loading a checkpoint) for
:class:`~anomaly_bench.ops.screen.ScreenedSearch`, which skips bank entries with a
bfloat16 screen and measures the rest in float32 (CPUs with AMX; elsewhere the plain
blocked search of :func:`~anomaly_bench.ops.knn.knn`). When K covers the whole training
set every test image has the same gallery, and all positions of a batch are searched
against the bank at once; otherwise each test image's gallery is the rows of its K images,
read in place.
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
from anomaly_bench.ops.screen import ScreenedSearch, screen_available
from anomaly_bench.schema import Key, one_of
from anomaly_bench.types import Batch, Prediction

#: Smallest search (query rows x gallery rows) worth the screen's set-up per call.
_SCREEN_PAIRS = 2**24
GALLERIES = ("nearest", "random")


class Spade(AnomalyMethod):
    name = "spade"

    def __init__(self, extractor: torch.nn.Module, *, k: int, kappa: int,
                 global_layer: str | None, pixel_layers: Sequence[str] | None,
                 blur_sigma: float, blur_border: str, gallery: str, seed: int) -> None:
        super().__init__()
        selected = list(extractor.block_names)  # feature names, shallowest first
        allowed = ", ".join(selected)
        how = ("layers.<stage>=-1" if getattr(extractor, "kind", "cnn") == "cnn"
               else "layers.blocks=[...]")
        if global_layer is None:
            global_layer = selected[-1]
        if global_layer not in selected:
            raise ConfigError(
                f"method.global_layer={global_layer!r} is not a feature of the selected "
                f"blocks ({extractor.tag}): allowed names are {allowed}, or null for the "
                f"deepest ({selected[-1]}); select more blocks with {how}."
            )
        pixel = [s for s in selected if s != global_layer] if pixel_layers is None \
            else list(pixel_layers)
        missing = [s for s in pixel if s not in selected]
        if missing or not pixel:
            raise ConfigError(
                f"method.pixel_layers={pixel} must name at least one selected feature "
                f"({extractor.tag}): allowed names are {allowed}"
                + ("" if pixel_layers is not None else
                   f", other than method.global_layer={global_layer}")
                + f"; select more blocks with {how}."
            )
        if k < 1 or kappa < 1:
            raise ConfigError(f"method.k={k} and method.kappa={kappa} must be at least 1.")
        if gallery not in GALLERIES:
            raise ConfigError(f"method.gallery={gallery} is not one of {', '.join(GALLERIES)}.")
        self.extractor = extractor
        self.k, self.kappa = k, kappa
        self.global_layer = global_layer
        self.pixel_layers = pixel
        self.blur_sigma = blur_sigma
        self.blur_border = blur_border
        self.gallery = gallery
        self._rng = torch.Generator().manual_seed(seed)
        self.register_buffer("global_bank", None)  # (N, C)
        for s in pixel:
            self.register_buffer(f"bank_{s}", None)  # (N, h, w, C)
        self._screens: dict[str, tuple[tuple, ScreenedSearch | None]] = {}

    def _features(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            feats = self.extractor(images)
        glob = feats[self.global_layer].mean(dim=(2, 3))
        return glob, {s: feats[s].permute(0, 2, 3, 1).contiguous() for s in self.pixel_layers}

    def fit_bytes(self, n_images: int, shapes: Mapping[str, tuple[int, int, int]]) -> int:
        """The banks: every training image's pixel-layer maps and global vector."""
        per_image = sum(c * h * w for s, (c, h, w) in shapes.items() if s in self.pixel_layers)
        return 4 * n_images * (per_image + shapes[self.global_layer][0])

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
            self._screen(s)  # built here, so its set-up counts as training time

    def _screen(self, layer: str) -> ScreenedSearch | None:
        """The screened search over one block's bank, or None where the plain search is
        used (kappa > 1, no AMX, small banks); rebuilt when the bank changes."""
        bank: torch.Tensor = getattr(self, f"bank_{layer}")
        # a checkpoint loaded into fitted buffers is copied in place: same storage, new
        # version
        key = (bank.data_ptr(), bank._version, tuple(bank.shape))
        cached = self._screens.get(layer)
        if cached is None or cached[0] != key:
            n, h, w, c = bank.shape
            # a gallery holds min(k, N) images; one image's queries against it
            work = h * w * min(self.k, n) * h * w
            use = (self.kappa == 1 and screen_available() and bank.device.type == "cpu"
                   and bank.dtype == torch.float32 and work >= _SCREEN_PAIRS)
            cached = key, ScreenedSearch(bank.view(-1, c)) if use else None
            self._screens[layer] = cached
        return cached[1]

    def _galleries(self, near: torch.Tensor, n_train: int) -> torch.Tensor | None:
        """(B, K) training images per test image; None when every gallery is the whole set."""
        k = near.shape[1]
        if k == n_train:
            return None
        if self.gallery == "random":
            draw = torch.rand(near.shape[0], n_train, generator=self._rng)
            return draw.argsort(dim=1)[:, :k].to(near.device)
        return near

    def _pixel_sqdist(self, layer: str, query: torch.Tensor, gallery: torch.Tensor | None
                      ) -> torch.Tensor:
        """(B, h, w) mean squared distance of every test position to its ``kappa`` nearest
        features among its gallery's positions (``query`` (B, h, w, C))."""
        bank: torch.Tensor = getattr(self, f"bank_{layer}")
        _, h, w, c = bank.shape
        flat_bank = bank.view(-1, c)
        screen = self._screen(layer)
        b = query.shape[0]
        if gallery is None:  # one gallery for all: every position of the batch at once
            q = query.reshape(-1, c)
            if screen is not None:
                return screen.nearest(q)[0].view(b, h, w)
            return knn(q, flat_bank, min(self.kappa, flat_bank.shape[0])
                       ).distances.square().mean(dim=1).view(b, h, w)
        out = torch.empty(b, h, w, device=query.device, dtype=query.dtype)
        positions = torch.arange(h * w, device=gallery.device)
        for i in range(b):  # each test image has its own gallery
            q = query[i].reshape(-1, c)
            if screen is not None:
                rows = (gallery[i].unsqueeze(1) * (h * w) + positions).flatten()
                out[i] = screen.nearest(q, rows)[0].view(h, w)
            else:
                g = bank[gallery[i]].reshape(-1, c)
                kk = min(self.kappa, g.shape[0])
                out[i] = knn(q, g, kk).distances.square().mean(dim=1).view(h, w)
        return out

    def predict(self, batch: Batch) -> Prediction:
        if self.global_bank is None:
            raise RuntimeError("SPADE.predict called before fit")
        size = tuple(batch.images.shape[-2:])
        glob, maps = self._features(batch.images)
        k = min(self.k, self.global_bank.shape[0])
        with torch.no_grad():
            near = knn(glob, self.global_bank, k)
            scores = near.distances.square().mean(dim=1)
            gallery = self._galleries(near.indices, self.global_bank.shape[0])
            total = torch.zeros(glob.shape[0], 1, *size, device=glob.device)
            for s in self.pixel_layers:
                layer_map = self._pixel_sqdist(s, maps[s], gallery).unsqueeze(1)
                total += F.interpolate(layer_map, size=size, mode="bilinear",
                                       align_corners=False)
            total /= len(self.pixel_layers)
            anomaly_maps = gaussian_blur(total, self.blur_sigma, self.blur_border).squeeze(1)
        return Prediction(image_scores=scores, anomaly_maps=anomaly_maps)


SCHEMA = {
    "k": Key(int, lo=1),
    "kappa": Key(int, lo=1),
    "global_layer": Key(str, null=True),  # a selected feature name, checked when built
    "pixel_layers": Key("names", null=True),
    "gallery": one_of(*GALLERIES),
}


@register("spade", SCHEMA)
def _build(method_cfg: Mapping[str, Any], backbone_cfg: Mapping[str, Any],
           layers_cfg: Mapping[str, Any], seed: int) -> Spade:
    pixel = method_cfg["pixel_layers"]
    glob = method_cfg["global_layer"]
    return Spade(
        build_extractor(backbone_cfg, layers_cfg, seed),
        k=int(method_cfg["k"]),
        kappa=int(method_cfg["kappa"]),
        global_layer=None if glob is None else str(glob),
        pixel_layers=(None if pixel is None else [pixel] if isinstance(pixel, str)
                      else [str(p) for p in pixel]),
        blur_sigma=float(method_cfg["blur_sigma"]),
        blur_border=str(method_cfg["blur_border"]),
        gallery=str(method_cfg["gallery"]),
        seed=seed,
    )
