"""Pieces shared by the feature-based methods: extractor construction, map post-processing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from anomaly_bench.backbones import Backbone, FeatureExtractor
from anomaly_bench.backbones.cache import FeatureCache
from anomaly_bench.backbones.clip import ClipBackbone
from anomaly_bench.backbones.vit import VitExtractor
from anomaly_bench.errors import ConfigError
from anomaly_bench.ops.blur import gaussian_blur


def build_extractor(backbone_cfg: Mapping[str, Any], layers_cfg: Mapping[str, Any],
                    seed: int, trainable: bool = False) -> Backbone:
    """The backbone described by a backbone config group and its layers, frozen unless
    ``trainable`` (a ViT its method trains: MMR's encoder).

    ``backbone.kind`` picks the implementation: ``cnn`` (timm ResNets, blocks chosen per
    stage by ``layers.layer1`` .. ``layer4``), ``vit`` (timm ViTs and the MAE encoder) or
    ``clip`` (open_clip's image tower, with text embeddings), whose transformer blocks
    are chosen by ``layers.blocks``. Selecting the other kind's keys is an error before
    any image is read.
    """
    kind = backbone_cfg.get("kind", "cnn")
    if trainable and kind != "vit":
        raise ConfigError(f"backbone {backbone_cfg['name']} (kind={kind}) cannot be trained "
                          "here: trained backbones are timm ViTs (kind=vit).")
    stages = {k: v for k, v in layers_cfg.items() if k.startswith("layer")}
    blocks = layers_cfg.get("blocks")
    common = {"hub_tag": backbone_cfg.get("hub_tag"),
              "pretrained": bool(backbone_cfg.get("pretrained", True)),
              "weights": backbone_cfg.get("weights"), "seed": seed,
              "shared": bool(backbone_cfg.get("shared", True))}
    if kind in ("vit", "clip"):
        used = {k: v for k, v in stages.items() if v is not None}
        if used:
            raise ConfigError(
                f"layers.{next(iter(used))}={next(iter(used.values()))} selects a CNN stage but "
                f"backbone {backbone_cfg['name']} is a vision transformer: choose its blocks "
                "with layers.blocks=[...] and set layers.layer1..layer4 to null (layers=vit)."
            )
        if kind == "clip":
            common.pop("shared")
            extractor: Backbone = ClipBackbone(
                backbone_cfg["name"], list(blocks or []),
                image_size=backbone_cfg.get("image_size"),
                quick_gelu=bool(backbone_cfg.get("quick_gelu", False)), **common)
        else:
            extractor = VitExtractor(
                backbone_cfg["name"], list(blocks or []), url=backbone_cfg.get("weights_url"),
                mean=backbone_cfg.get("mean"), std=backbone_cfg.get("std"), trainable=trainable,
                **common)
    elif kind == "cnn":
        if blocks:
            raise ConfigError(
                f"layers.blocks={list(blocks)} selects transformer blocks but backbone "
                f"{backbone_cfg['name']} is a CNN: choose its blocks with layers.layer1..layer4."
            )
        extractor = FeatureExtractor(backbone_cfg["name"], stages,
                                     truncate=bool(backbone_cfg.get("truncate", True)), **common)
    else:
        raise ConfigError(f"backbone.kind={kind!r} is not one of cnn, vit, clip.")
    extractor.set_precision(str(backbone_cfg.get("precision", "fp32")))
    cache = backbone_cfg.get("cache") or {}
    if cache.get("enabled"):
        extractor.attach_cache(FeatureCache(cache["dir"], extractor.backbone_id,
                                            cache.get("max_gb")))
    return extractor


def upsample_nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="nearest")``; integer factors as a cheaper pure copy."""
    h, w = x.shape[-2:]
    if size[0] % h == 0 and size[1] % w == 0:
        fh, fw = size[0] // h, size[1] // w
        b, c = x.shape[:2]
        return x[:, :, :, None, :, None].expand(b, c, h, fh, w, fw).reshape(b, c, *size)
    return F.interpolate(x, size=size, mode="nearest")


def split_channels(channels: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Sorted indices into concatenated channels, as local indices of each part of ``sizes``."""
    out, offset = [], 0
    for n in sizes:
        out.append(channels[(channels >= offset) & (channels < offset + n)] - offset)
        offset += n
    return out


def concat_pyramid(features: Mapping[str, torch.Tensor],
                   channels: torch.Tensor | None = None) -> torch.Tensor:
    """Upsample every map to the first (finest) map's grid (nearest) and concatenate.

    ``channels`` (sorted indices into the concatenated channels) keeps only those; the
    selection happens before upsampling, so dropped channels cost nothing.
    """
    maps = list(features.values())
    if channels is not None:
        local = split_channels(channels, [m.shape[1] for m in maps])
        maps = [m.index_select(1, i) for m, i in zip(maps, local, strict=True)]
    size = tuple(maps[0].shape[-2:])
    return torch.cat([m if tuple(m.shape[-2:]) == size else upsample_nearest(m, size)
                      for m in maps], dim=1)


def to_image_maps(patch_scores: torch.Tensor, image_size: tuple[int, int],
                  sigma: float, border: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear-upsample (B, h, w) patch scores to the image, blur, and take the max.

    ``border`` is the blur's border convention (``method.blur_border``: ``mirror`` or
    ``reflect``, see :func:`~anomaly_bench.ops.blur.gaussian_blur`).
    Returns (image scores (B,), anomaly maps (B, H, W)).
    """
    maps = F.interpolate(patch_scores.unsqueeze(1), size=image_size, mode="bilinear",
                         align_corners=False)
    maps = gaussian_blur(maps, sigma, border).squeeze(1)
    return maps.flatten(1).amax(dim=1), maps
