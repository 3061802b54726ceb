"""Frozen CNN feature extractor that returns chosen blocks of chosen stages.

A ResNet-style network (ResNet, WideResNet, ResNeXt from timm) is a stem followed by the
stages ``layer1`` .. ``layer4``, each a sequence of residual blocks. ``layers`` selects,
per stage, the block whose output is wanted (``-1`` = the last block = the stage output,
``None`` = stage unused). The forward pass stops after the last block any selection needs
and the stages after it are dropped from memory, so e.g. a layer2-only selection never
computes layer3. With a :class:`~anomaly_bench.backbones.cache.FeatureCache` attached (see
:class:`~anomaly_bench.backbones.base.Backbone`), the stages it runs are completed and
every block output is cached for later selections.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from anomaly_bench.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone
from anomaly_bench.backbones.cache import Kept
from anomaly_bench.backbones.weights import (
    fetch_state_dict,
    hub_access,
    load_into,
    offline_message,
    read_state_dict,
    weights_tag,
)
from anomaly_bench.errors import ConfigError, WeightsError

STAGES = ("layer1", "layer2", "layer3", "layer4")


_MODELS: dict[tuple, tuple[nn.Module, str]] = {}
#: architecture -> {"layerS.i": (channels, stride)} of every block, probed once per process
_BLOCK_SHAPES: dict[str, dict[str, tuple[int, int]]] = {}


def create_timm_model(name: str, hub_tag: str | None, pretrained: bool, weights: str | None,
                      seed: int, shared: bool = True,
                      url: str | None = None) -> tuple[nn.Module, str]:
    """The frozen timm model ``name`` with its weights, built once per process.

    Extractors never modify their network (frozen, eval mode), so every extractor with
    the same architecture and weights shares one instance: a sweep that runs many jobs in
    one process pays the construction (seconds for a WideResNet) only once. A weights file
    is keyed by its path, size and modification time. ``shared=False`` builds a private
    instance (for loading other weights into it). ``url``: weights published at a URL
    (with ``pretrained``), e.g. MAE's.
    """
    if not shared:
        return _build_timm_model(name, hub_tag, pretrained, weights, seed, url)
    stamp = None
    if weights:
        p = Path(weights).expanduser()
        stamp = (str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
    key = (name, hub_tag, bool(pretrained), str(weights), stamp, seed, url)
    if key not in _MODELS:
        model, tag = _build_timm_model(name, hub_tag, pretrained, weights, seed, url)
        _MODELS.clear()  # keep one network alive at a time
        _MODELS[key] = (model.eval().requires_grad_(False), tag)
    return _MODELS[key]


def _architecture_kwargs(name: str) -> dict[str, object]:
    """timm arguments per family: ResNets without zero-initialised residual branches
    (torchvision-style, so every block transforms its input); ViTs without a classifier
    and with position embeddings interpolated to any input size."""
    if "resnet" in name or "resnext" in name:
        return {"zero_init_last": False}
    if name.startswith(("vit_", "deit", "eva", "beit")):
        return {"num_classes": 0, "dynamic_img_size": True}
    return {}


def _build_timm_model(name: str, hub_tag: str | None, pretrained: bool, weights: str | None,
                      seed: int, url: str | None = None) -> tuple[nn.Module, str]:
    """Build ``name`` with timm and load its weights; return (model, weights tag).

    Order of precedence: a local ``weights`` file, then (with ``pretrained``) the
    weights at ``url`` or else timm's hub weights, else a random initialisation seeded
    with ``seed``.
    """
    import timm

    full = f"{name}.{hub_tag}" if hub_tag else name
    if not timm.is_model(name):
        raise ConfigError(
            f"backbone.name={name} is not a timm architecture (e.g. wide_resnet50_2, resnet18)."
        )
    kwargs = _architecture_kwargs(name)
    if weights or (pretrained and url):
        state = (read_state_dict(weights) if weights
                 else fetch_state_dict(str(url), f"{name} from {url}"))
        model = timm.create_model(name if url and not weights else full, pretrained=False,
                                  **kwargs)
        load_into(model, state, f"backbone.weights={weights}" if weights else str(url))
        return model, weights_tag(name, hub_tag, pretrained, weights, seed, url)
    if pretrained:
        cfg = timm.models.get_pretrained_cfg(full)
        if cfg is None:
            raise ConfigError(f"timm has no pretrained weights named {full}.")
        hf_id = cfg.hf_hub_id
        if hf_id and hf_id.endswith("/"):
            hf_id = hf_id + full
        with hub_access(full, hf_id, cfg.url):
            try:
                model = timm.create_model(full, pretrained=True, **kwargs)
            except Exception as exc:
                raise WeightsError(offline_message(full, f"{type(exc).__name__}: {exc}")) from exc
        return model, weights_tag(name, hub_tag, pretrained, None, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(full, pretrained=False, **kwargs)
    return model, weights_tag(name, hub_tag, False, None, seed)


def _probe_blocks(model: nn.Module, size: int = 64) -> dict[str, tuple[int, int]]:
    """(channels, stride) of every block of a ResNet-style network, from one small pass.

    Once per architecture and process: a layer sweep's jobs select other blocks of the
    same network and reuse it.
    """
    out = {}
    model.eval()  # never update normalisation statistics
    with torch.inference_mode():
        x = torch.zeros(1, 3, size, size)
        for module in (model.conv1, model.bn1, model.act1, model.maxpool):
            x = module(x)
        for stage in STAGES:
            for i, block in enumerate(getattr(model, stage)):
                x = block(x)
                out[f"{stage}.{i}"] = (int(x.shape[1]), size // int(x.shape[-1]))
    return out


def resolve_selection(stage_sizes: Mapping[str, int], layers: Mapping[str, int | None],
                      backbone: str) -> dict[str, int]:
    """Map ``{stage: index or None}`` to ``{stage: non-negative block index}`` in stage order."""
    unknown = set(layers) - set(STAGES)
    if unknown:
        raise ConfigError(f"layers has unknown keys {sorted(unknown)}; expected {list(STAGES)}.")
    out: dict[str, int] = {}
    for stage in STAGES:
        idx = layers.get(stage)
        if idx is None:
            continue
        n = stage_sizes[stage]
        if not isinstance(idx, int) or not -n <= idx < n:
            raise ConfigError(
                f"layers.{stage}={idx} is out of range: {backbone} {stage} has {n} blocks "
                f"(use 0..{n - 1}, -1 for the last block, or null to leave the stage out)."
            )
        out[stage] = idx % n
    if not out:
        raise ConfigError("layers selects no stage: set at least one of layers.layer1..layer4.")
    return out


def selection_tag(selection: Mapping[str, int]) -> str:
    """Compact, explicit name of a selection, e.g. ``layer1.2+layer2.3+layer3.5``."""
    return "+".join(f"{stage}.{idx}" for stage, idx in selection.items())


class FeatureExtractor(Backbone):
    """Frozen CNN returning ``{stage: block output}`` for the selected blocks.

    Outputs are (B, C, h, w) tensors in the channels-last memory format the convolutions
    run in: every method reads them per position (a C-vector per pixel), which that layout
    stores contiguously, and converting costs a copy of every map.
    """

    kind = "cnn"

    def __init__(self, name: str, layers: Mapping[str, int | None], *, hub_tag: str | None = None,
                 pretrained: bool = True, weights: str | None = None, seed: int = 0,
                 truncate: bool = True, shared: bool = True) -> None:
        """``truncate=False`` keeps the whole network and runs its full forward pass
        (classifier included), collecting the selected blocks with forward hooks; it costs
        more and exists to measure what truncation saves. ``shared=False`` gives the
        extractor a private network instead of the per-process shared one."""
        super().__init__()
        model, self.weights_tag = create_timm_model(name, hub_tag, pretrained, weights, seed,
                                                    shared)
        if not all(isinstance(getattr(model, s, None), nn.Sequential) for s in STAGES):
            raise ConfigError(
                f"backbone {name} has no ResNet-style stages layer1..layer4; block selection "
                "needs a ResNet, WideResNet or ResNeXt."
            )
        self.name = name
        sizes = {s: len(getattr(model, s)) for s in STAGES}
        self.selection = resolve_selection(sizes, layers, name)
        self.stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
        last_stage = list(self.selection)[-1]
        keep = STAGES if not truncate else STAGES[: STAGES.index(last_stage) + 1]
        self.stages = nn.ModuleDict({s: getattr(model, s) for s in keep})
        self.truncate = truncate
        self.cache = None
        self.backbone_id = f"{name}.{hub_tag}|{self.weights_tag}"
        data = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(data.get("mean", IMAGENET_MEAN))
        self.std = tuple(data.get("std", IMAGENET_STD))
        self.input_size = int(data.get("input_size", (3, 224, 224))[-1])
        self.head = None if truncate else nn.Sequential(model.global_pool, model.fc)
        # channels-last convolutions: the same results, about 30% faster on CPU (oneDNN)
        # and the layout tensor cores prefer on CUDA
        self.to(memory_format=torch.channels_last)
        self.eval().requires_grad_(False)
        if name not in _BLOCK_SHAPES:  # the architecture alone fixes widths and strides
            _BLOCK_SHAPES[name] = _probe_blocks(model)
        shapes = _BLOCK_SHAPES[name]
        self.channels = {s: shapes[f"{s}.{i}"][0] for s, i in self.selection.items()}
        self.strides = {s: shapes[f"{s}.{i}"][1] for s, i in self.selection.items()}

    @property
    def tag(self) -> str:
        return selection_tag(self.selection)

    @property
    def block_names(self) -> dict[str, str]:
        return {s: f"{s}.{i}" for s, i in self.selection.items()}

    def stored_blocks(self) -> dict[str, tuple[int, int]]:
        """Every block of the stages this extractor runs (a run for the cache keeps them all)."""
        shapes = _BLOCK_SHAPES[self.name]
        return {f"{s}.{i}": shapes[f"{s}.{i}"] for s, blocks in self.stages.items()
                for i in range(len(blocks))}

    def kept_blocks(self) -> dict[str, Kept]:
        """Every stored block of a stage read in part keeps the channels read from that
        stage: the other jobs of a layer sweep select other blocks of the same stage, and
        the blocks of a stage have the same width, so a method that picks channels by
        width and seed (PaDiM) reads the same ones there. A job reading other channels
        finds none in the memo (its keys name the channels) and reads the files."""
        return {n: self.read[s] for n, (c, _) in self.stored_blocks().items()
                if (s := n.split(".")[0]) in self.read and c == self.channels[s]}

    def _run(self, images: torch.Tensor, every_block: bool) -> dict[str, torch.Tensor]:
        """Outputs ``{"layerS.i": tensor}`` of the selected blocks, or of every block run.

        Without ``every_block`` the pass stops right after the last selected block."""
        last_stage = list(self.selection)[-1]
        x = self.stem(images.contiguous(memory_format=torch.channels_last))
        out: dict[str, torch.Tensor] = {}
        for stage, blocks in self.stages.items():
            want = self.selection.get(stage)
            for i, block in enumerate(blocks):
                if (self.truncate and not every_block and stage == last_stage
                        and i > self.selection[last_stage]):
                    return out
                x = block(x)
                if every_block or i == want:
                    out[f"{stage}.{i}"] = x.contiguous(memory_format=torch.channels_last)
        if self.head is not None:
            self.head(x)  # full forward, as a hook-based extractor would run it
        return out
