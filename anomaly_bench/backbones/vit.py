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
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch

from anomaly_bench.backbones.base import Backbone
from anomaly_bench.backbones.extractor import create_timm_model
from anomaly_bench.errors import ConfigError


def blocks_tag(selection: Sequence[int]) -> str:
    """The ``layers`` tag of transformer blocks (0-based, sorted): ``blocks.5+blocks.11``."""
    return "+".join(f"blocks.{i}" for i in selection)


class TokenGridBackbone(Backbone):
    """A transformer whose selected blocks' patch tokens are maps ``{"block<i>": ...}``.

    Subclasses give ``_intermediates(images, indices)``: the blocks' patch tokens as
    (B, C, h, w), prefix tokens dropped, the pass stopped after the last index.
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
    def _intermediates(self, images: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        """The patch-token maps of blocks ``indices`` (in order)."""

    def _run(self, images: torch.Tensor, every_block: bool) -> dict[str, torch.Tensor]:
        """Patch tokens of the selected blocks, or of every block up to the last selected."""
        indices = list(range(self.selection[-1] + 1)) if every_block else self.selection
        maps = self._intermediates(images, indices)
        return {f"blocks.{i}": m.contiguous(memory_format=torch.channels_last)
                for i, m in zip(indices, maps, strict=True)}


class VitExtractor(TokenGridBackbone):
    """Patch-token maps ``{"block<i>": (B, C, h, w)}`` of the selected transformer blocks."""

    kind = "vit"

    def __init__(self, name: str, blocks: Sequence[int], *, hub_tag: str | None = None,
                 pretrained: bool = True, weights: str | None = None, url: str | None = None,
                 seed: int = 0, shared: bool = True, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__()
        model, self.weights_tag = create_timm_model(name, hub_tag, pretrained, weights, seed,
                                                    shared, url)
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
        self.eval().requires_grad_(False)

    def _intermediates(self, images: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        return self.model.forward_intermediates(images, indices=indices, output_fmt="NCHW",
                                                intermediates_only=True, stop_early=True)
