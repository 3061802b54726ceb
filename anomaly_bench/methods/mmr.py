"""MMR: Masked Multi-scale Reconstruction (Zhang et al., 2023), as its official code computes it.

A ViT encoder (MAE's ViT-B/16, ``backbone=mae_vit_base``, trained) sees a masked image
(``mask_ratio`` of the patches dropped as MAE drops them, none at test time); the kept
tokens, put back on the patch grid with a learned mask token at the dropped positions
and a fixed sin-cos position embedding added, go through a simple feature pyramid (per
scale: transposed convolutions up, max-pooling down, then a 1x1 and a 3x3 convolution
each followed by a channel LayerNorm) that reconstructs the frozen CNN teacher's
features (``method.teacher``, WideResNet50-2 layer1-3 after their last block, in eval
mode). Loss: the sum over scales of the mean over every position (masked and visible)
of 1 - cosine similarity over channels. Anomaly map: per scale 1 - cosine between
teacher and reconstruction, bilinear to the input size with corners aligned, summed,
blurred (sigma 4, scipy's reflect border); image score: the map's maximum.

Masking (``method.masking``): ``random`` (MAE's) or ``saliency``: the masked patches are
split between the bounding boxes of the image's spectral-residual salient regions and
the rest (:mod:`anomaly_bench.ops.saliency`, :mod:`anomaly_bench.ops.masking`), in
proportion to the boxes' area or by ``method.saliency_split``.

Training follows the official code: its train view (random resized crop, scale 0.7-1,
ratio 3/4-4/3, bicubic, and a horizontal flip) instead of the test preprocessing, AdamW
(lr 1e-3, betas 0.9/0.95, weight decay 0.05 except on 1-D parameters and biases; the
class and mask tokens are decayed), learning rate per epoch linear from 0 over 50
warm-up epochs, then /10 from epochs 120 and 160 (1-based), 200 epochs, batch 16; the
encoder's position embedding stays fixed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomaly_bench.backbones.base import Backbone
from anomaly_bench.data.loading import IMAGE_FILTERS
from anomaly_bench.data.source import TrainSource
from anomaly_bench.data.views import RandomResizedCrop
from anomaly_bench.errors import ConfigError
from anomaly_bench.methods.base import AnomalyMethod, comparable, register, role_config
from anomaly_bench.methods.common import build_extractor
from anomaly_bench.ops.blur import gaussian_blur
from anomaly_bench.ops.masking import guided_keep, kept_count, random_keep
from anomaly_bench.ops.saliency import salient_boxes, spectral_residual
from anomaly_bench.schema import BLOCK, Key, one_of
from anomaly_bench.training import TRAIN_SCHEMA, TrainSettings, train
from anomaly_bench.types import Batch, Prediction

SCHEMA = {
    "teacher_layers": {f"layer{i}": BLOCK for i in range(1, 5)},
    "mask_ratio": Key(float, above=0, below=1),
    "masking": one_of("random", "saliency"),
    "saliency_split": Key(float, lo=0, hi=1, null=True),
    "saliency_threshold": Key(float, above=0, below=1, null=True),
    "scales": Key("any", null=True),
    "widths": Key("any", null=True),
    "epochs": Key(int, lo=1),
    "train_size": Key(int, lo=16, null=True),
    "train_scale": Key("any"),
    "train_ratio": Key("any"),
    "train_resample": one_of(*IMAGE_FILTERS),
    "train_flip": Key(bool),
    "channels_last": Key(bool),
    "amp": Key(bool),
    "train": TRAIN_SCHEMA,
}


def sincos_position_embedding(dim: int, h: int, w: int) -> torch.Tensor:
    """(h * w, dim) fixed 2-D sin-cos position embedding, as MAE's
    ``get_2d_sincos_pos_embed`` (first half from the column index, second from the row
    index; each half sin then cos of position x 1/10000^(2i/d)), computed in float64."""
    if dim % 4:
        raise ConfigError(f"a sin-cos position embedding needs a width divisible by 4, not {dim}.")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def half(pos: torch.Tensor) -> torch.Tensor:
        out = pos.flatten()[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                                torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.cat([half(cols), half(rows)], dim=1).float()


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of (B, C, H, W) maps (ConvNeXt's and ViTDet's)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


def pyramid_stage(dim: int, scale: float, width: int) -> nn.Sequential:
    """ViTDet's simple-FPN stage from the (B, dim, h, w) token grid to ``scale`` x its
    resolution and ``width`` channels."""
    layers: list[nn.Module]
    if scale == 4:
        layers = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), ChannelNorm(dim // 2),
                  nn.GELU(), nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)]
        out = dim // 4
    elif scale == 2:
        layers, out = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
    elif scale == 1:
        layers, out = [], dim
    elif scale == 0.5:
        layers, out = [nn.MaxPool2d(2, stride=2)], dim
    else:
        raise ConfigError(f"method.scales holds {scale}: the pyramid has scales 4, 2, 1 and 0.5.")
    layers += [nn.Conv2d(out, width, 1, bias=False), ChannelNorm(width),
               nn.Conv2d(width, width, 3, padding=1, bias=False), ChannelNorm(width)]
    return nn.Sequential(*layers)


class MMR(AnomalyMethod):
    """Masked multi-scale reconstruction of a frozen teacher's features by a trained ViT."""

    name = "mmr"

    def __init__(self, encoder: Backbone, teacher: Backbone, *, mask_ratio: float, masking: str,
                 saliency_split: float | None, saliency_threshold: float | None,
                 scales: list[float], widths: list[int], blur_sigma: float, blur_border: str,
                 train_view: RandomResizedCrop, settings: TrainSettings, channels_last: bool,
                 amp: bool, seed: int, description: Mapping[str, Any]) -> None:
        super().__init__()
        self.encoder = encoder  # built first: it reads the input
        self.teacher = teacher
        self.mask_ratio, self.masking = mask_ratio, masking
        self.saliency_split, self.saliency_threshold = saliency_split, saliency_threshold
        self.blur_sigma, self.blur_border = blur_sigma, blur_border
        self.train_view, self.settings = train_view, settings
        self.channels_last, self.amp = channels_last, amp
        self.description = dict(description)
        self.feature_names = list(teacher.channels)
        dim = int(next(iter(encoder.channels.values())))
        self.patch = int(next(iter(encoder.strides.values())))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dim).normal_(std=0.02))
            self.pyramid = nn.ModuleList(pyramid_stage(dim, s, w)
                                         for s, w in zip(scales, widths, strict=True))
        if channels_last:
            self.pyramid.to(memory_format=torch.channels_last)
        self._positions: dict[tuple, torch.Tensor] = {}
        t_mean, t_std = torch.tensor(teacher.mean), torch.tensor(teacher.std)
        e_mean, e_std = torch.tensor(encoder.mean), torch.tensor(encoder.std)
        # teacher input = encoder input converted to the teacher's statistics (identity
        # when both use ImageNet's): x_t = x * a + b per channel
        self.register_buffer("teacher_scale", (e_std / t_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("teacher_shift", ((e_mean - t_mean) / t_std).view(1, 3, 1, 1),
                             persistent=False)
        self._renormalise = not (torch.equal(e_mean, t_mean) and torch.equal(e_std, t_std))

    # ------------------------------------------------------------------ pieces
    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def teacher_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen teacher's selected maps (no graph)."""
        with torch.no_grad():
            x = images * self.teacher_scale + self.teacher_shift if self._renormalise else images
            feats = self.teacher(x)
        return [feats[n] for n in self.feature_names]

    def _position(self, h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
        key = (h, w, dim, str(device))
        if key not in self._positions:
            self._positions[key] = sincos_position_embedding(dim, h, w).to(device)
        return self._positions[key]

    def keep_indices(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K) kept patch indices of a training batch (``mask_ratio`` dropped), drawn
        from the global generator (saved and restored with the training state)."""
        b, _, height, width = images.shape
        gh, gw = height // self.patch, width // self.patch
        n = gh * gw
        noise = torch.rand(b, n, device=images.device)
        k = kept_count(n, self.mask_ratio)
        if self.masking == "random":
            return random_keep(noise, k)
        mean = torch.tensor(self.encoder.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.encoder.std, device=images.device).view(1, 3, 1, 1)
        rgb = (images * std + mean).clamp(0, 1)
        inside = salient_boxes(spectral_residual(rgb), (gh, gw), self.saliency_threshold)
        return guided_keep(noise, inside, k, self.saliency_split)

    def reconstruct(self, images: torch.Tensor, keep: torch.Tensor | None) -> list[torch.Tensor]:
        """The pyramid's maps from the encoder's tokens of the kept patches (all patches
        when ``keep`` is None)."""
        b, _, height, width = images.shape
        gh, gw = height // self.patch, width // self.patch
        n = gh * gw
        full = keep is None
        if full:
            keep = torch.arange(n, device=images.device).expand(b, n)
        tokens = self.encoder.forward_kept(images, keep[:, None])[:, 0, 1:]  # class token out
        c = tokens.shape[-1]
        if not full:  # mask tokens at the dropped positions
            grid = self.mask_token.to(tokens.dtype).expand(b, n, c)
            tokens = grid.scatter(1, keep[..., None].expand(-1, -1, c), tokens)
        tokens = tokens + self._position(gh, gw, c, images.device).to(tokens.dtype)
        x = tokens.transpose(1, 2).reshape(b, c, gh, gw)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return [stage(x) for stage in self.pyramid]

    @staticmethod
    def distances(teacher: list[torch.Tensor], recon: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per scale (B, h, w) maps of 1 - cosine similarity over channels."""
        return [1 - F.cosine_similarity(t.float(), r.float(), dim=1)
                for t, r in zip(teacher, recon, strict=True)]

    # ------------------------------------------------------------------ lifecycle
    def training_step(self, batch: Batch) -> torch.Tensor:
        images = batch.images
        teacher = self.teacher_features(images)
        recon = self.reconstruct(images, self.keep_indices(images))
        return sum(d.mean() for d in self.distances(teacher, recon))

    def fit(self, source: TrainSource) -> None:
        ctx = self.context
        self.losses = train(self, source, self.settings, ctx.device,
                            state_path=ctx.out_dir / "train_state.pt", resume=ctx.resume,
                            description={**self.description, "dataset": ctx.dataset,
                                         "category": ctx.category, "seed": ctx.seed},
                            desc=f"train mmr {ctx.category}")

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) summed upsampled distances before the blur."""
        dists = self.distances(self.teacher_features(images), self.reconstruct(images, None))
        size = tuple(images.shape[-2:])
        return sum(F.interpolate(d[:, None], size=size, mode="bilinear", align_corners=True)
                   for d in dists)[:, 0]

    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        images = batch.images
        dtype = torch.float16 if images.device.type == "cuda" else torch.bfloat16
        with torch.autocast(images.device.type, dtype=dtype, enabled=self.amp):
            maps = self.anomaly_maps(images)
        maps = gaussian_blur(maps.float()[:, None], self.blur_sigma, self.blur_border)[:, 0]
        return Prediction(image_scores=maps.flatten(1).amax(1), anomaly_maps=maps)


def _pair(value: Any, key: str) -> tuple[float, float]:
    if not (isinstance(value, list | tuple) and len(value) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            and 0 < value[0] <= value[1]):
        raise ConfigError(f"method.{key}={value!r} is not allowed: expected [low, high] with "
                          "0 < low <= high.")
    return float(value[0]), float(value[1])


def check_networks(method_cfg: Mapping[str, Any], backbone_cfg: Mapping[str, Any]) -> None:
    """ConfigError when the encoder is not a ViT or the teacher not a CNN (before building)."""
    kind = backbone_cfg.get("kind", "cnn")
    if kind != "vit":
        raise ConfigError(
            f"method=mmr trains a vision transformer encoder on masked patches, but "
            f"backbone={backbone_cfg.get('name')} is a {kind.upper() if kind == 'cnn' else kind}"
            " backbone: use backbone=mae_vit_base (MAE's ViT-B/16, the published choice) or "
            "another timm ViT (backbone.kind=vit).")
    teacher = method_cfg["teacher"]
    if teacher.get("kind", "cnn") != "cnn":
        raise ConfigError(
            f"method.teacher={teacher.get('name')} is a {teacher.get('kind')} backbone, but "
            "MMR reconstructs the multi-scale maps of a CNN teacher (layer1..layer3): use "
            "method.teacher=wide_resnet50_2 (the published choice) or another ResNet-style "
            "backbone such as resnet18.")


@register("mmr", SCHEMA, roles=("teacher",))
def _build(method_cfg: Mapping[str, Any], backbone_cfg: Mapping[str, Any],
           layers_cfg: Mapping[str, Any], seed: int) -> MMR:
    """``layers`` does not apply: the encoder's output is its last block after the final
    norm, and the teacher's blocks are ``method.teacher_layers``."""
    check_networks(method_cfg, backbone_cfg)
    scale_range = _pair(method_cfg["train_scale"], "train_scale")
    ratio_range = _pair(method_cfg["train_ratio"], "train_ratio")
    if scale_range[1] > 1:
        raise ConfigError(f"method.train_scale={list(scale_range)}: the crop's area fraction "
                          "is at most 1.")
    encoder = build_extractor(backbone_cfg, {"blocks": [-1]}, seed, trainable=True)
    teacher = build_extractor(role_config(method_cfg, backbone_cfg, "teacher"),
                              method_cfg["teacher_layers"], seed)
    model = encoder.model
    if getattr(model, "pos_embed", None) is not None:
        if encoder.weights_tag.startswith("random("):  # MMR's own initialisation: sin-cos
            grid = model.patch_embed.grid_size
            pos = sincos_position_embedding(model.pos_embed.shape[-1], *grid)
            n_prefix = model.pos_embed.shape[1] - pos.shape[0]
            model.pos_embed.data.copy_(torch.cat([torch.zeros(n_prefix, pos.shape[1]), pos])[None])
        model.pos_embed.requires_grad_(False)  # fixed, as MAE's and MMR's
    patch = int(next(iter(encoder.strides.values())))
    strides = [teacher.strides[n] for n in teacher.channels]
    channels = [teacher.channels[n] for n in teacher.channels]
    scales = method_cfg["scales"]
    scales = [patch / s for s in strides] if scales is None else [float(s) for s in scales]
    widths = method_cfg["widths"]
    widths = channels if widths is None else [int(w) for w in widths]
    if len(scales) != len(channels) or widths != channels:
        raise ConfigError(
            f"method.scales={scales} and method.widths={widths} must give one pyramid level "
            f"per teacher feature ({', '.join(teacher.channels)}: widths {channels}, scales "
            f"{[patch / s for s in strides]} for a patch of {patch}); null derives them.")
    if any(math.isclose(patch / s, sc) is False for s, sc in zip(strides, scales, strict=True)):
        raise ConfigError(f"method.scales={scales} do not bring the {patch}-pixel patch grid "
                          f"to the teacher's strides {strides}; null derives them.")
    view = RandomResizedCrop(size=method_cfg["train_size"], scale=scale_range, ratio=ratio_range,
                             resample=method_cfg["train_resample"], flip=method_cfg["train_flip"])
    description = {"method": comparable(dict(method_cfg)), "backbone": backbone_cfg["name"],
                   "weights": encoder.weights_tag + " + teacher=" + teacher.weights_tag}
    return MMR(encoder, teacher, mask_ratio=float(method_cfg["mask_ratio"]),
               masking=method_cfg["masking"], saliency_split=method_cfg["saliency_split"],
               saliency_threshold=method_cfg["saliency_threshold"], scales=scales,
               widths=widths, blur_sigma=float(method_cfg["blur_sigma"]),
               blur_border=method_cfg["blur_border"], train_view=view,
               settings=TrainSettings.from_config(method_cfg["train"]),
               channels_last=bool(method_cfg["channels_last"]), amp=bool(method_cfg["amp"]),
               seed=seed, description=description)
