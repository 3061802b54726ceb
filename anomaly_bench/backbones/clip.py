"""Frozen open_clip image and text towers: patch tokens of chosen blocks, prompt embeddings.

``backbone=clip_vit_b16_plus_240`` (WinCLIP) or ``backbone=clip_vit_l14_336`` (APRIL-GAN)
build an open_clip model. Its image tower is a :class:`~anomaly_bench.backbones.base.
Backbone` like the others: ``layers.blocks`` selects transformer blocks whose patch
tokens become (B, C, h, w) maps of stride = patch size, cached like any block output.
:meth:`ClipBackbone.encode_text` embeds prompts (the tokenizer ships with open_clip, so
it needs no network) and :meth:`ClipBackbone.encode_image` gives the joint-space image
embedding, both L2-normalised, which is what CLIP-based methods compare.

The position embedding is fixed at creation, so the model is built for one input size
(``backbone.image_size``, null = the model's own; APRIL-GAN runs ViT-L-14-336 at 518 px,
open_clip interpolates the pretrained embedding): preprocessing must produce exactly that
size, which :attr:`fixed_size` tells the runner before any image is read. Weights:
``backbone.hub_tag`` (e.g. ``laion400m_e31``, ``openai``) when ``pretrained``, a local
file with ``backbone.weights``, or a seeded random initialisation.

``backbone.quick_gelu=true`` builds the towers with QuickGELU, the activation OpenAI's
CLIP weights were trained with; ``false`` keeps the model config's own (GELU for
``ViT-L-14-336``, which is how the official APRIL-GAN code builds it, so its published
numbers come from GELU). The choice changes the features, so it is part of the weights
tag (``+quick_gelu``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from anomaly_bench.backbones.base import Features
from anomaly_bench.backbones.vit import TokenGridBackbone
from anomaly_bench.backbones.weights import (
    hub_access,
    load_into,
    offline_message,
    read_state_dict,
    weights_tag,
)
from anomaly_bench.errors import ConfigError, WeightsError


def _open_clip():
    try:
        import open_clip
    except ImportError as exc:  # a dependency of the package; a broken install says so
        raise ConfigError(f"backbone.kind=clip needs open_clip_torch ({exc}).") from None
    return open_clip


def create_clip_model(name: str, hub_tag: str | None, pretrained: bool, weights: str | None,
                      seed: int, image_size: int | None,
                      quick_gelu: bool = False) -> tuple[torch.nn.Module, str]:
    """The open_clip model ``name`` and its weights tag (file, hub tag or seeded random;
    ``+quick_gelu`` when built with QuickGELU)."""
    open_clip = _open_clip()
    if name not in open_clip.list_models():
        raise ConfigError(f"backbone.name={name} is not an open_clip model (e.g. "
                          "ViT-B-16-plus-240, ViT-L-14-336).")
    kwargs: dict = {"force_image_size": image_size} if image_size else {}
    if quick_gelu:
        kwargs["force_quick_gelu"] = True
    tag = weights_tag(name, hub_tag, pretrained, weights, seed, kind="clip",
                      quick_gelu=quick_gelu)
    if pretrained and not weights:
        if not hub_tag:
            raise ConfigError(f"backbone.hub_tag names the pretrained weights of {name} "
                              "(e.g. openai, laion400m_e31).")
        cfg = open_clip.get_pretrained_cfg(name, hub_tag) or {}
        hf_id = (cfg.get("hf_hub") or "").rstrip("/") or None
        with hub_access(f"{name}/{hub_tag}", hf_id, cfg.get("url")):
            try:
                model = open_clip.create_model(name, pretrained=hub_tag, **kwargs)
            except Exception as exc:
                raise WeightsError(offline_message(f"{name}/{hub_tag}",
                                                   f"{type(exc).__name__}: {exc}")) from exc
        return model.eval().requires_grad_(False), tag
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None, **kwargs)
    if weights:
        load_into(model, read_state_dict(weights), f"backbone.weights={weights}")
    return model.eval().requires_grad_(False), tag


class ClipBackbone(TokenGridBackbone):
    """Patch-token maps ``{"block<i>": (B, C, h, w)}`` of CLIP's image tower, plus the
    joint image and text embeddings."""

    kind = "clip"

    def __init__(self, name: str, blocks: Sequence[int], *, hub_tag: str | None = None,
                 pretrained: bool = True, weights: str | None = None, seed: int = 0,
                 image_size: int | None = None, quick_gelu: bool = False) -> None:
        super().__init__()
        self.model, self.weights_tag = create_clip_model(name, hub_tag, pretrained, weights,
                                                         seed, image_size, quick_gelu)
        visual = self.model.visual
        self._select(blocks, len(visual.transformer.resblocks), f"{name}'s image tower")
        self.name = name
        self.backbone_id = f"open_clip:{name}@{image_size}|{self.weights_tag}"
        pre = getattr(visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(float(m) for m in pre.get("mean", self.mean))
        self.std = tuple(float(s) for s in pre.get("std", self.std))
        self.fixed_size = int(visual.image_size[0])
        self.input_size = self.fixed_size
        patch = int(visual.patch_size[0])
        width = int(visual.transformer.width)
        #: Dimension of the joint image-text space (what encode_text/encode_image return).
        self.embed_dim = int(visual.output_dim)
        self.channels = {f"block{i}": width for i in self.selection}
        self.strides = {f"block{i}": patch for i in self.selection}
        self._tokenizer = _open_clip().get_tokenizer(name)
        self.eval().requires_grad_(False)

    def _check_size(self, images: torch.Tensor) -> None:
        if tuple(images.shape[-2:]) != (self.fixed_size, self.fixed_size):
            raise ConfigError(
                f"backbone {self.name} takes {self.fixed_size} px images but got "
                f"{tuple(images.shape[-2:])}: set resolution.size/crop to {self.fixed_size} "
                "(or backbone.image_size to the size you want)."
            )

    def _intermediates(self, images: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        self._check_size(images)
        return self.model.visual.forward_intermediates(
            images, indices=indices, intermediates_only=True, output_fmt="NCHW",
            stop_early=True)["image_intermediates"]

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) L2-normalised text embeddings of ``texts`` (on the model's device)."""
        device = next(self.model.parameters()).device
        tokens = self._tokenizer(list(texts)).to(device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised joint-space embeddings of normalised images."""
        return F.normalize(self.model.encode_image(images).float(), dim=-1)

    def features_and_embedding(self, images: torch.Tensor) -> tuple[Features, torch.Tensor]:
        """The selected blocks' patch-token maps (as calling the backbone gives them) and
        the (B, D) L2-normalised joint-space image embedding (as :meth:`encode_image`),
        from one pass through the whole tower; with the feature cache attached the maps
        come from the cache and the embedding from its own pass."""
        if self.cache is not None:
            return self(images), self.encode_image(images)
        self._check_size(images)
        out = self.model.visual.forward_intermediates(
            images, indices=self.selection, output_fmt="NLC", intermediates_only=False,
            stop_early=False)
        b, n = images.shape[0], self.fixed_size // self.strides[f"block{self.selection[0]}"]
        # (B, h*w, C) tokens viewed as (B, C, h, w) in the channels-last layout, uncopied
        maps = {f"block{i}": t.reshape(b, n, n, -1).permute(0, 3, 1, 2)
                for i, t in zip(self.selection, out["image_intermediates"], strict=True)}
        return Features(maps), F.normalize(out["image_features"].float(), dim=-1)
