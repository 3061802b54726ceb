"""Frozen vision transformer returning the patch tokens of chosen blocks as feature maps.

Any timm ViT (``vit_base_patch16_224``, DeiT, ...) through ``forward_intermediates``:
``blocks`` selects transformer blocks by index (``-1`` = the last); each block's patch
tokens, class and register tokens dropped, become a (B, C, h, w) map of stride = patch
size, so the feature-map methods (PaDiM, PatchCore, ...) run on it unchanged. The pass
stops after the last selected block (``stop_early``). Position embeddings are
interpolated to the input size, so any resolution a method uses works. An MAE encoder is
the same architecture with MAE's weights (``backbone=mae_vit_base``: its published file
by URL or ``backbone.weights=mae_visualize_vit_base.pth``; the decoder is ignored) and
ImageNet input statistics.

Masked input (MAE, MMR; WinCLIP's windows on a CLIP tower): :meth:`TokenGridBackbone.
forward_kept` runs the transformer on chosen patch tokens only, each sequence the class
token plus the kept patches, with the position embedding added before the others are
dropped, so every kept token keeps its position. Built ``trainable`` (the method decides),
the network is a private copy whose parameters take gradients.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch

from anomaly_bench.backbones.base import CLASS_TOKEN, Backbone
from anomaly_bench.backbones.extractor import create_timm_model
from anomaly_bench.errors import ConfigError


def blocks_tag(selection: Sequence[int]) -> str:
    """The ``layers`` tag of transformer blocks (0-based, sorted): ``blocks.5+blocks.11``."""
    return "+".join(f"blocks.{i}" for i in selection)


class TokenGridBackbone(Backbone):
    """A transformer whose selected blocks' patch tokens are maps ``{"block<i>": ...}``.

    Subclasses give ``_intermediates(images, indices)``: the blocks' patch tokens as
    (B, C, h, w), prefix tokens dropped, the pass stopped after the last index, and each
    block's (B, C) class token when ``has_class_token``.
    """

    selection: list[int]
    n_blocks: int

    def _select(self, blocks: Sequence[int], n: int, what: str) -> None:
        picked = []
        for b in blocks:
            if isinstance(b, bool) or not isinstance(b, int) or not -n <= b < n:
                raise ConfigError(
                    f"layers.blocks holds {b!r}: {what} has {n} transformer blocks (use "
                    f"0..{n - 1}, or -1 for the last)."
                )
            picked.append(b % n)
        if not picked:
            raise ConfigError("layers.blocks is empty: name at least one transformer block.")
        self.selection = sorted(set(picked))
        self.n_blocks = n

    @property
    def block_names(self) -> dict[str, str]:
        return {f"block{i}": f"blocks.{i}" for i in self.selection}

    @property
    def tag(self) -> str:
        return blocks_tag(self.selection)

    @abstractmethod
    def _intermediates(self, images: torch.Tensor, indices: list[int]
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The patch-token maps of blocks ``indices`` (in order), and their class tokens
        (None without ``has_class_token``)."""

    @abstractmethod
    def forward_kept(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Tokens of masked sequences after the last block and the final norm.

        ``images`` (B, 3, H, W); ``keep`` (B, S, K) long indices into the row-major
        h*w patch grid: S sequences per image, each the class token plus the K kept
        patch tokens (position embedding added before dropping, as MAE does). Returns
        (B, S, 1 + K, C), the class token first; gradients flow when the backbone is
        trainable.
        """

    def _run(self, images: torch.Tensor, every_block: bool) -> dict[str, torch.Tensor]:
        """Patch tokens of the selected blocks, or of every block up to the last selected."""
        indices = list(range(self.selection[-1] + 1)) if every_block else self.selection
        maps, tokens = self._intermediates(images, indices)
        out = {f"blocks.{i}": m.contiguous(memory_format=torch.channels_last)
               for i, m in zip(indices, maps, strict=True)}
        for i, t in zip(indices, tokens or [], strict=tokens is not None):
            out[f"blocks.{i}{CLASS_TOKEN}"] = t[:, :, None, None]
        return out


class VitExtractor(TokenGridBackbone):
    """Patch-token maps ``{"block<i>": (B, C, h, w)}`` of the selected transformer blocks."""

    kind = "vit"

    def __init__(self, name: str, blocks: Sequence[int], *, hub_tag: str | None = None,
                 pretrained: bool = True, weights: str | None = None, url: str | None = None,
                 seed: int = 0, shared: bool = True, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, trainable: bool = False) -> None:
        """``trainable``: a private network whose parameters take gradients (else the
        frozen per-process shared one)."""
        super().__init__()
        self.trainable = trainable
        model, self.weights_tag = create_timm_model(name, hub_tag, pretrained, weights, seed,
                                                    shared and not trainable, url)
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "blocks"):
            raise ConfigError(f"backbone {name} is not a vision transformer with blocks.")
        self._select(blocks, len(model.blocks), name)
        self.model = model
        self.name = name
        self.backbone_id = f"{name}.{hub_tag}|{self.weights_tag}"
        data = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(float(m) for m in (mean or data.get("mean", self.mean)))
        self.std = tuple(float(s) for s in (std or data.get("std", self.std)))
        self.input_size = int(data.get("input_size", (3, 224, 224))[-1])
        patch = int(model.patch_embed.patch_size[0])
        self.channels = {f"block{i}": int(model.embed_dim) for i in self.selection}
        self.strides = {f"block{i}": patch for i in self.selection}
        self.eval().requires_grad_(trainable)
        if getattr(model, "cls_token", None) is None:
            self._no_class = f"backbone {name} has no class token"
        self.has_class_token = not self._no_class

    _no_class = ""

    def _intermediates(self, images: torch.Tensor, indices: list[int]
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        out = self.model.forward_intermediates(
            images, indices=indices, output_fmt="NCHW", intermediates_only=True,
            stop_early=True, return_prefix_tokens=self.has_class_token)
        if not self.has_class_token:
            return out, None
        # (map, prefix tokens) per block; the class token leads the prefix (registers follow)
        return [m for m, _ in out], [p[:, 0] for _, p in out]

    def forward_kept(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """See :meth:`TokenGridBackbone.forward_kept`: timm's embedding with its position
        embedding (resampled to the grid), then one gather of the kept patch tokens for
        all S sequences of all images, and the blocks on the (B*S, prefix + K) sequences.
        Register tokens, where a model has them, run with every sequence and are dropped
        from the output."""
        if self._no_class:
            raise ConfigError(f"{self._no_class}: masked sequences need one (e.g. a ViT "
                              "with global_pool=token such as MAE's).")
        m = self.model
        x = m._pos_embed(m.patch_embed(images))  # (B, prefix + h*w, C), positions added
        n_prefix = int(m.num_prefix_tokens)
        b, s, k = keep.shape
        c = x.shape[-1]
        patches = x[:, n_prefix:]
        kept = patches.gather(1, keep.reshape(b, s * k, 1).expand(-1, -1, c))
        prefix = x[:, None, :n_prefix].expand(-1, s, -1, -1)
        seq = torch.cat([prefix, kept.view(b, s, k, c)], dim=2).reshape(b * s, n_prefix + k, c)
        seq = m.norm(m.blocks(m.norm_pre(m.patch_drop(seq))))
        seq = seq.view(b, s, n_prefix + k, c)
        return seq if n_prefix == 1 else torch.cat([seq[:, :, :1], seq[:, :, n_prefix:]], 2)
