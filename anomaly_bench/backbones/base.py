"""The one interface every backbone kind offers the methods, and the caching below it.

A backbone returns named intermediate feature maps, ``{name: (B, C, h, w)}``, and says
for each its channels and stride (``channels``, ``strides``: a ViT's patch tokens become
a grid of stride = patch size), plus what identifies it: ``name``, ``kind``, the
``weights_tag`` recorded in every result, the ``backbone_id`` that keys cached features,
its own input normalisation (``mean``, ``std``) and its preferred input size
(``input_size``), which preprocessing uses. Methods see only features; whether they came
from the network or from the feature cache is decided here, not in the method maths.

A backbone is frozen (eval mode, no gradients) unless its method builds it ``trainable``
(MMR's encoder): a trainable one follows ``train()``/``eval()``, its parameters take
gradients, and it never uses the feature cache (its outputs change as it learns), so
attaching one is an error.

A transformer with a class token (``has_class_token``) also gives, per selected block,
that block's class token beside its patch-token map (:attr:`Features.class_tokens`, the
raw residual stream as the map is): APRIL-GAN and WinCLIP score the image from it.

A subclass implements ``_run(images, every_block)`` (the selected blocks, or every block
its forward pass runs, by block name; a block's class token as a (B, C, 1, 1) entry
named ``<block>`` + :data:`CLASS_TOKEN`) and ``block_names`` (feature name -> block
name). With a :class:`~anomaly_bench.backbones.cache.FeatureCache` attached, a batch is
served from the cache when every image has every selected block (and class token);
otherwise the network runs every block it passes through and all of them are stored, so
later jobs selecting other blocks read them too.

A method that reads a fixed subset of each feature's channels (PaDiM: a seeded 550 of
WideResNet50-2's 1792) says so with :meth:`Backbone.read_only`: features then come with
only those channels, and the process memo holds only those channels of each cached block
(the files keep whole blocks for readers of other channels), which is what bounds the
memory of a layer sweep's process.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping

import torch
from torch import nn

from anomaly_bench.backbones.cache import FeatureCache, Kept, kept_channels, select_channels
from anomaly_bench.errors import ConfigError
from anomaly_bench.memo import Derived, known, row_keys

#: ImageNet's input statistics: the normalisation of timm's CNNs, MAE and most ViTs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Suffix of a block's class-token entry among ``_run``'s outputs and in the cache.
CLASS_TOKEN = ".cls"


class Features(dict):
    """``{name: (B, C, h, w) block output}`` as a plain dict, plus what names its content.

    ``sources[name]`` identifies that tensor's values (backbone and weights, block, and
    the content key of every image) when they came through the feature cache, else it is
    absent. :meth:`lazy` hands a block to :func:`~anomaly_bench.memo.derive` with that
    key, so what a method derives from it is memoised across the jobs of a sweep.
    ``class_tokens[name]``: the (B, C) class token of that block, where the backbone has
    one (empty otherwise).
    """

    def __init__(self, blocks: Mapping[str, torch.Tensor],
                 sources: Mapping[str, tuple] | None = None,
                 class_tokens: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__(blocks)
        self.sources: dict[str, tuple] = dict(sources or {})
        self.class_tokens: dict[str, torch.Tensor] = dict(class_tokens or {})

    def lazy(self, name: str) -> Derived[torch.Tensor]:
        """Block ``name`` as an input of :func:`~anomaly_bench.memo.derive`, keyed by its
        source when the content is known."""
        return known(self[name], self.sources.get(name))


class Backbone(nn.Module):
    """A feature extractor, frozen unless built trainable; see the module docstring."""

    kind: str = ""
    name: str = ""
    weights_tag: str = ""
    backbone_id: str = ""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    channels: dict[str, int]
    strides: dict[str, int]
    cache: FeatureCache | None = None
    #: Built to be trained by its method (MMR's encoder); False = frozen.
    trainable: bool = False
    #: Every block has a class token, given in :attr:`Features.class_tokens`.
    has_class_token: bool = False

    def __init__(self) -> None:
        super().__init__()
        #: per feature name, the channels :meth:`read_only` keeps
        self.read: dict[str, Kept] = {}

    def read_only(self, channels: Mapping[str, torch.Tensor]) -> None:
        """From now on, give only channels ``channels[f]`` (sorted, distinct indices) of
        each feature ``f`` named there; the others stay whole."""
        for f, index in channels.items():
            if f not in self.channels:
                raise ValueError(f"read_only: {self.name} has no feature {f!r}")
            index = torch.as_tensor(index)
            n = self.channels[f]
            if index.dim() != 1 or index.dtype.is_floating_point or not index.numel() \
                    or bool((index[1:] <= index[:-1]).any()) or index[0] < 0 or index[-1] >= n:
                raise ValueError(f"read_only: channels of {f} must be sorted distinct "
                                 f"indices in 0..{n - 1}")
            self.read[f] = kept_channels(index)
            # the same indices on the module's device, for features computed there
            self.register_buffer(f"read_{f}", self.read[f][0].clone(), persistent=False)

    def kept_blocks(self) -> dict[str, Kept]:
        """The channels the process memo keeps of each stored block it keeps only in part
        (by block name): those of the feature read from it."""
        return {self.block_names[f]: kept for f, kept in self.read.items()}

    def memo_blocks(self) -> dict[str, tuple[int, int]]:
        """``{block name: (channels, stride)}`` of what the memo holds per image of each
        stored block: :meth:`stored_blocks` with only the kept channels."""
        kept = self.kept_blocks()
        return {n: (len(kept[n][0]) if n in kept else c, stride)
                for n, (c, stride) in self.stored_blocks().items()}

    @property
    @abstractmethod
    def block_names(self) -> dict[str, str]:
        """Feature name -> name of the block that produces it, in output order."""

    @property
    @abstractmethod
    def tag(self) -> str:
        """Which blocks are used, e.g. ``layer1.2+layer2.3`` or ``blocks.3+blocks.7``."""

    @abstractmethod
    def _run(self, images: torch.Tensor, every_block: bool) -> dict[str, torch.Tensor]:
        """``{block name: output}`` of the selected blocks, or of every block run."""

    #: dtype of the forward pass under autocast (None: float32 throughout)
    autocast_dtype: torch.dtype | None = None

    def set_precision(self, precision: str) -> None:
        """Run the forward pass in ``bf16`` or ``fp16`` autocast (``fp32``: no autocast).

        Only the backbone: its block outputs are cast back to float32, so a method's maths
        (Gaussians, distances) stay in float32. The precision is part of ``backbone_id``,
        which keys the feature cache: outputs of another precision are never mixed in.
        """
        dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        self.autocast_dtype = dtypes[precision]
        if self.autocast_dtype is not None:
            self.backbone_id += f"|{precision}"

    def _blocks(self, images: torch.Tensor, every_block: bool) -> dict[str, torch.Tensor]:
        """:meth:`_run` under the configured autocast, outputs in float32."""
        if self.autocast_dtype is None:
            return self._run(images, every_block)
        with torch.autocast(images.device.type, dtype=self.autocast_dtype):
            out = self._run(images, every_block)
        return {k: v.float() for k, v in out.items()}

    def stored_blocks(self) -> dict[str, tuple[int, int]]:
        """``{block name: (channels, stride)}`` of every output the feature cache stores per
        image (what a run for the cache computes); by default the selected blocks."""
        return {n: (self.channels[f], self.strides[f]) for f, n in self.block_names.items()}

    def train(self, mode: bool = True) -> Backbone:
        """A frozen backbone stays in eval mode (normalisation statistics never move)."""
        return super().train(mode and self.trainable)

    def attach_cache(self, cache: FeatureCache | None) -> None:
        """Serve and store block outputs through ``cache`` (None detaches)."""
        if cache is not None and self.trainable:
            raise ConfigError(
                f"backbone {self.name} is trained by its method, so its outputs change with "
                "every step and cannot come from the feature cache: set "
                "backbone.cache.enabled=false for it."
            )
        self.cache = cache

    def forward(self, images: torch.Tensor) -> Features:
        selected = self.block_names
        if self.cache is None:
            blocks = self._blocks(images, every_block=False)
            for f, n in selected.items():
                if f in self.read:
                    blocks[n] = select_channels(blocks[n], self.get_buffer(f"read_{f}"))
            return self._features(blocks, selected)
        keys = row_keys(images)  # attached by the loader to memoised samples, else hashed
        h, w = images.shape[-2:]
        shapes = {}  # (C, h, w) per block; the grid is known where the stride divides the size
        for f, n in selected.items():
            st = self.strides[f]
            exact = h % st == 0 and w % st == 0
            shapes[n] = (self.channels[f], h // st if exact else None, w // st if exact else None)
            if self.has_class_token:
                shapes[n + CLASS_TOKEN] = (self.channels[f], 1, 1)
        kept = self.kept_blocks()
        hit = self.cache.load(keys, list(shapes), shapes, kept)
        if hit is None:
            blocks = self.cache.store(keys, self._blocks(images, every_block=True), kept)
            hit = {n: blocks[n] for n in shapes}
        origin = (str(self.cache.dir), tuple(keys))
        hit = {n: t.to(images.device, non_blocking=True) for n, t in hit.items()}
        # a part is named by its channels, as the memo holds it
        return self._features(hit, selected, {
            f: (*origin, n, *((kept[n][1],) if n in kept else ())) for f, n in selected.items()})

    def _features(self, blocks: Mapping[str, torch.Tensor], selected: Mapping[str, str],
                  sources: Mapping[str, tuple] | None = None) -> Features:
        """The selected blocks' maps (and class tokens) of ``_run``'s or the cache's output."""
        tokens = ({f: blocks[n + CLASS_TOKEN].flatten(1) for f, n in selected.items()}
                  if self.has_class_token else None)
        return Features({f: blocks[n] for f, n in selected.items()}, sources, tokens)
