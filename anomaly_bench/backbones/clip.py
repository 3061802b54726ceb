"""Frozen open_clip image and text towers: patch tokens of chosen blocks, prompt embeddings.

``backbone=clip_vit_b16_plus_240`` (WinCLIP) or ``backbone=clip_vit_l14_336`` (APRIL-GAN)
build an open_clip model. Its image tower is a :class:`~anomaly_bench.backbones.base.
Backbone` like the others: ``layers.blocks`` selects transformer blocks whose patch
tokens become (B, C, h, w) maps of stride = patch size, with each block's class token in
:attr:`~anomaly_bench.backbones.base.Features.class_tokens` (the raw residual stream,
before ``ln_post``), cached like any block output. :meth:`ClipBackbone.encode_text`
embeds prompts (the tokenizer ships with open_clip, so it needs no network);
:meth:`ClipBackbone.embed_class_tokens` takes last-block class tokens into the joint
space (``ln_post``, projection), :meth:`ClipBackbone.encode_image` does the whole pass,
and :meth:`ClipBackbone.encode_windows` embeds windows of patches (WinCLIP): each window
its own sequence of the class token and the window's patch tokens through the tower
(:meth:`ClipBackbone.forward_kept`). Joint-space embeddings are L2-normalised, which is
what CLIP-based methods compare; :meth:`ClipBackbone.final_norm` is the tower's
``ln_post`` alone (WinCLIP's few-shot patch features).

The position embedding is fixed at creation, so the model is built for one input size
(``backbone.image_size``, null = the model's own; APRIL-GAN runs ViT-L-14-336 at 518 px):
preprocessing must produce exactly that size, which :attr:`fixed_size` tells the runner
before any image is read. Weights: ``backbone.hub_tag`` (e.g. ``laion400m_e31``,
``openai``) when ``pretrained``, a local file with ``backbone.weights``, or a seeded
random initialisation. Hub and local weights made for another size are interpolated the
same way, by open_clip's ``resize_pos_embed`` (the class token's embedding kept, the
patch grid resampled bicubically with antialiasing, as the official APRIL-GAN code
does for ViT-L-14-336 at 518 px).

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

#: Tokens per chunk of the window pass (bounds its activations: at width 896 and the MLP's
#: 4x expansion, about 0.6 GB in float32).
CHUNK_TOKENS = 1 << 15


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
        state = read_state_dict(weights)
        open_clip.model.resize_pos_embed(state, model)  # as the hub path: another size
        load_into(model, state, f"backbone.weights={weights}")
    return model.eval().requires_grad_(False), tag


class ClipBackbone(TokenGridBackbone):
    """Patch-token maps ``{"block<i>": (B, C, h, w)}`` and class tokens of CLIP's image
    tower, plus the joint image, window and text embeddings."""

    kind = "clip"
    has_class_token = True

    def __init__(self, name: str, blocks: Sequence[int], *, hub_tag: str | None = None,
                 pretrained: bool = True, weights: str | None = None, seed: int = 0,
                 image_size: int | None = None, quick_gelu: bool = False) -> None:
        super().__init__()
        self.model, self.weights_tag = create_clip_model(name, hub_tag, pretrained, weights,
                                                         seed, image_size, quick_gelu)
        visual = self.model.visual
        self._select(blocks, len(visual.transformer.resblocks), f"{name}'s image tower")
        self.name = name
        # everything that changes the tokens: architecture, input size, weights, library
        self.backbone_id = (f"open_clip:{name}@{image_size}|{self.weights_tag}"
                            f"|open_clip={_open_clip().__version__}")
        pre = getattr(visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(float(m) for m in pre.get("mean", self.mean))
        self.std = tuple(float(s) for s in pre.get("std", self.std))
        self.fixed_size = int(visual.image_size[0])
        self.input_size = self.fixed_size
        patch = int(visual.patch_size[0])
        width = int(visual.transformer.width)
        self.grid = tuple(int(g) for g in visual.grid_size)
        #: Dimension of the joint image-text space (what encode_text/encode_image return).
        self.embed_dim = int(visual.output_dim)
        self.channels = {f"block{i}": width for i in self.selection}
        self.strides = {f"block{i}": patch for i in self.selection}
        self._tokenizer = _open_clip().get_tokenizer(name)
        self._pooled_by_class = (getattr(visual, "attn_pool", None) is None
                                 and getattr(visual, "pool_type", "tok") == "tok")
        self.eval().requires_grad_(False)

    def _check_size(self, images: torch.Tensor) -> None:
        if tuple(images.shape[-2:]) != (self.fixed_size, self.fixed_size):
            raise ConfigError(
                f"backbone {self.name} takes {self.fixed_size} px images but got "
                f"{tuple(images.shape[-2:])}: set resolution.size/crop to {self.fixed_size} "
                "(or backbone.image_size to the size you want)."
            )

    def _check_class_pooled(self) -> None:
        if not self._pooled_by_class:
            raise ConfigError(
                f"backbone {self.name} pools its image embedding from all tokens (not from "
                "the class token), so class tokens and windows have no joint-space "
                "embedding: choose a CLIP ViT with class-token pooling (e.g. "
                "ViT-B-16-plus-240, ViT-L-14-336).")

    def _intermediates(self, images: torch.Tensor, indices: list[int]
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        self._check_size(images)
        out = self.model.visual.forward_intermediates(
            images, indices=indices, intermediates_only=True, output_fmt="NCHW",
            stop_early=True, output_extra_tokens=True)
        return (out["image_intermediates"],
                [t[:, 0] for t in out["image_intermediates_prefix"]])

    def forward_kept(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """See :meth:`TokenGridBackbone.forward_kept`: the tower's embedding (class token,
        position embedding, ``ln_pre``, all per token), one gather of the kept patch
        tokens for all S sequences of all images, then the blocks and ``ln_post`` on the
        (B*S, 1 + K) sequences in chunks of :data:`CHUNK_TOKENS` tokens."""
        seq = self._sequences(images, keep)
        step = max(1, CHUNK_TOKENS // seq.shape[1])
        visual = self.model.visual
        out = torch.cat([visual.ln_post(visual.transformer(part)) for part in seq.split(step)])
        return out.view(*keep.shape[:2], *out.shape[1:])

    def _sequences(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(B*S, 1 + K, C): per image and sequence, the class token and the kept patch
        tokens after the embedding (positions added, ``ln_pre``; all per token)."""
        self._check_size(images)
        x = self.model.visual._embeds(images)  # (B, 1 + h*w, C)
        b, s, k = keep.shape
        c = x.shape[-1]
        kept = x[:, 1:].gather(1, keep.reshape(b, s * k, 1).expand(-1, -1, c))
        seq = torch.cat([x[:, None, :1].expand(-1, s, -1, -1), kept.view(b, s, k, c)], dim=2)
        return seq.reshape(b * s, 1 + k, c)

    def encode_windows(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(B, S, D) L2-normalised joint-space embeddings of windows: ``keep`` (B, S, K)
        as in :meth:`forward_kept`, each window's class token after ``ln_post`` through
        the projection.

        Only the class token leaves the last block, so there the patch tokens give keys
        and values and nothing else: its query, attention output and MLP run for the
        class token alone (6% of the window pass at ViT-B/16 with 2x2 and 3x3 windows;
        the plain pass where a block is not open_clip's standard one)."""
        self._check_class_pooled()
        seq = self._sequences(images, keep)
        step = max(1, CHUNK_TOKENS // seq.shape[1])
        visual = self.model.visual
        out = torch.cat([self._class_out(part) for part in seq.split(step)])
        return self._joint(visual.ln_post(out)).view(*keep.shape[:2], -1)

    def _class_out(self, seq: torch.Tensor) -> torch.Tensor:
        """(N, C) class tokens of (N, L, C) sequences after the last block."""
        transformer = self.model.visual.transformer
        *blocks, last = transformer.resblocks
        plain = (getattr(transformer, "batch_first", True) and not hasattr(last, "ln_1_kv")
                 and isinstance(getattr(last, "attn", None), torch.nn.MultiheadAttention)
                 and last.attn.batch_first)
        if not plain:
            return transformer(seq)[:, 0]
        for block in blocks:
            seq = block(seq)
        y = last.ln_1(seq)
        x = seq[:, :1] + last.ls_1(last.attn(y[:, :1], y, y, need_weights=False)[0])
        x = x + last.ls_2(last.mlp(last.ln_2(x)))
        return x[:, 0]

    def embed_class_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., D) L2-normalised joint-space embeddings of last-block class tokens
        (..., C): ``ln_post``, then the projection (the image embedding of CLIP)."""
        self._check_class_pooled()
        return self._joint(self.model.visual.ln_post(tokens))

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tower's final norm (``ln_post``) over the last dimension of ``tokens``."""
        return self.model.visual.ln_post(tokens)

    def _joint(self, pooled: torch.Tensor) -> torch.Tensor:
        proj = self.model.visual.proj
        return F.normalize((pooled @ proj if proj is not None else pooled).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) L2-normalised text embeddings of ``texts`` (on the model's device)."""
        return F.normalize(self.text_features(texts), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) joint-space text embeddings of ``texts``, not normalised (prompt
        ensembles that average before normalising, as WinCLIP's, need them raw)."""
        device = next(self.model.parameters()).device
        tokens = self._tokenizer(list(texts)).to(device)
        return self.model.encode_text(tokens).float()

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
            stop_early=False, output_extra_tokens=True)
        b, n = images.shape[0], self.fixed_size // self.strides[f"block{self.selection[0]}"]
        # (B, h*w, C) tokens viewed as (B, C, h, w) in the channels-last layout, uncopied
        maps = {f"block{i}": t.reshape(b, n, n, -1).permute(0, 3, 1, 2)
                for i, t in zip(self.selection, out["image_intermediates"], strict=True)}
        tokens = {f"block{i}": t[:, 0] for i, t in
                  zip(self.selection, out["image_intermediates_prefix"], strict=True)}
        return (Features(maps, class_tokens=tokens),
                F.normalize(out["image_features"].float(), dim=-1))
