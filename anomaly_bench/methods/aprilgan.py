"""APRIL-GAN (Chen, Han and Zhang, VAND 2023): CLIP with one linear adapter per block.

Zero-shot: the raw patch tokens of selected blocks of CLIP's image tower (the residual
stream after the block, no ``ln_post``) pass one trained ``Linear(width, embed_dim)``
adapter per block into the joint space, are L2-normalised and compared with a normal and
an abnormal text embedding of the category: logits ``scale * t @ [normal, abnormal]``
(scale 100, fixed) on the patch grid, upsampled bilinearly to the image with corners
aligned, softmax, abnormal channel; the per-block maps are summed (range 0 to the number
of blocks), no blur. The image score is CLIP's own: the class token through ``ln_post``
and the projection, L2-normalised, ``softmax(scale * f @ text)[abnormal]``.

The text embeddings are the official prompt ensemble: every state word (7 normal, 5
abnormal) in every template (35), each prompt embedded and L2-normalised, averaged per
state, normalised again. The class name in the prompts is the dataset's category name as
the official code's ``meta.json`` has it (``metal_nut``, ``pcb1``; ``class_names=words``
uses the layout's words instead).

Training (the auxiliary setting: the annotated test images of another dataset's
categories) fits the adapters alone with focal loss (gamma 2, on the softmax
probabilities, the official ``loss.py``) plus dice loss on the abnormal channel, summed
over the blocks. The official dice loss squeezes a batch of one into its rows; here it is
always per image. With ``stitch_rate`` > 0 (0.2 on MVTec AD in the official code), a
training image is replaced by a 2 x 2 mosaic of four images of its category, each drawn
as the official code draws them (a defect type, ``good`` included, then an image).

Few-shot (``k_shot`` references, at test time from the same adapters): a memory of the
references' raw tokens of ``memory_blocks`` (no adapter); per block ``min over memory of
(1 - cos)`` on the grid, upsampled the same way, summed, added to the zero-shot map. The
official image score is ``0.5 (p + m)``, with ``m`` each map's maximum min-max normalised
over the category's whole test set (:meth:`AprilGan.finish`), so one image's score
depends on the others; ``image_score=per_image`` uses the maximum divided by the number
of summed maps instead.

Two identities keep it cheap without changing a value beyond float rounding: the
abnormal softmax channel of two logits is the sigmoid of their difference, and bilinear
upsampling is linear, so one channel (the difference) is upsampled per block instead of
two; the few-shot maps of all blocks share one grid, so they are summed before a single
upsampling.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomaly_bench.backbones.base import Features
from anomaly_bench.errors import ConfigError
from anomaly_bench.methods.base import AnomalyMethod, register
from anomaly_bench.methods.common import build_extractor
from anomaly_bench.ops.blur import gaussian_blur
from anomaly_bench.ops.knn import max_cosine
from anomaly_bench.schema import Key, one_of
from anomaly_bench.training import TRAIN_SCHEMA, TrainSettings, train
from anomaly_bench.types import Batch, Prediction, SampleRecord

#: Keys acting only at test time (not compared with a checkpoint, taken from the run).
TEST_TIME = ("k_shot", "memory_blocks", "image_score")
IMAGE_SCORES = ("official", "per_image")
CLASS_NAMES = ("category", "words")


def prompt_sentences(name: str, states: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every state (``"flawless {}"``) of ``name`` in every template, state-major (the
    official order)."""
    return [t.format(s.format(name)) for s in states for t in templates]


def focal_loss(p_normal: torch.Tensor, p_abnormal: torch.Tensor, target: torch.Tensor,
               gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """The official focal loss on two-class probabilities (not logits), mean over pixels.

    As its ``FocalLoss`` computes it: the one-hot target clipped to ``[smooth,
    1 - smooth]``, ``pt`` = its dot product with the probabilities plus ``smooth``, loss
    ``-(1 - pt)^gamma log(pt)``.
    """
    hi, lo = 1.0 - smooth, smooth
    pt = torch.where(target > 0.5, hi * p_abnormal + lo * p_normal,
                     hi * p_normal + lo * p_abnormal) + smooth
    return (-(1.0 - pt).pow(gamma) * pt.log()).mean()


def dice_loss(p_abnormal: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - mean over images of (2 |p t| + 1) / (|p| + |t| + 1)`` for (B, H, W) inputs:
    the official ``BinaryDiceLoss`` for any batch size (its caller squeezes a batch of one
    into (H, W), which makes it a mean over rows)."""
    p, t = p_abnormal.flatten(1), target.flatten(1)
    dice = (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return 1 - dice.mean()


def upsample(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) grid values bilinearly upsampled to ``size`` with corners aligned (the
    official code's interpolation)."""
    return F.interpolate(grid.unsqueeze(1), size=size, mode="bilinear",
                         align_corners=True).squeeze(1)


class AprilGan(AnomalyMethod):
    """Linear adapters on CLIP's block tokens against prompt-ensemble text embeddings."""

    name = "aprilgan"

    def __init__(self, extractor: nn.Module, *, adapter_blocks: Sequence[int],
                 memory_blocks: Sequence[int], prompts: Mapping[str, Sequence[str]],
                 class_names: str, scale: float, image_score: str, stitch_rate: float,
                 settings: TrainSettings, description: Mapping[str, Any], seed: int,
                 blur_sigma: float, blur_border: str) -> None:
        super().__init__()
        self.extractor = extractor
        self.adapter_names = [f"block{i}" for i in adapter_blocks]
        self.memory_names = [f"block{i}" for i in memory_blocks]
        width = extractor.channels[self.adapter_names[0]]
        with torch.random.fork_rng(devices=[]):  # the adapters' initialisation is seeded
            torch.manual_seed(seed)
            self.adapters = nn.ModuleList(nn.Linear(width, extractor.embed_dim)
                                          for _ in adapter_blocks)
        self.states = (list(prompts["normal"]), list(prompts["abnormal"]))
        self.templates = list(prompts["templates"])
        self.class_names, self.scale = class_names, scale
        self.image_score, self.stitch_rate = image_score, stitch_rate
        self.settings, self.description = settings, dict(description)
        self.blur_sigma, self.blur_border = blur_sigma, blur_border
        self.text: dict[str, torch.Tensor] = {}  # category -> (D, 2) normal/abnormal
        self.memory: dict[str, torch.Tensor] | None = None  # block -> (N, C), normalised
        self.losses: list[float] = []
        self._pool: Any = None  # the training source while fitting (stitching draws there)

    # ------------------------------------------------------------------ text and memory
    def class_text(self, name: str) -> torch.Tensor:
        """(D, 2) normal and abnormal prompt-ensemble embeddings of class ``name``."""
        parts = []
        for states in self.states:
            emb = self.extractor.encode_text(prompt_sentences(name, states, self.templates))
            parts.append(F.normalize(emb.mean(dim=0), dim=0))
        return torch.stack(parts, dim=1)

    def setup(self, context) -> None:
        """Text embeddings of every category of the step; the few-shot memory of the
        tested category's references (raw tokens of ``memory_blocks``) when it has some."""
        super().setup(context)
        names = dict(context.class_names) or {context.category: context.class_name}
        self.text = {c: self.class_text(c if self.class_names == "category" else words)
                     for c, words in names.items()}
        self.memory = None
        if context.references is not None and self.k_shot:
            parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.memory_names}
            with torch.no_grad():
                for batch in context.references:
                    feats = self.extractor(batch.images)
                    for n in self.memory_names:
                        parts[n].append(F.normalize(_tokens(feats[n]).flatten(0, 1), dim=-1))
            self.memory = {n: torch.cat(p) for n, p in parts.items()}

    def _text_of(self, batch: Batch) -> torch.Tensor:
        """(B, D, 2) text embeddings of each image's category."""
        cats = batch.categories or [""] * len(batch.paths)
        try:
            return torch.stack([self.text[c or self.context.category] for c in cats])
        except KeyError as exc:
            raise ConfigError(f"aprilgan has no text embedding for category {exc}: setup "
                              "names every category the method sees.") from None

    # ------------------------------------------------------------------ the maths
    def logit_gaps(self, feats: Features, text: torch.Tensor) -> list[torch.Tensor]:
        """Per adapter block, (B, h, w) abnormal minus normal logit of each patch."""
        gaps = []
        for adapter, name in zip(self.adapters, self.adapter_names, strict=True):
            x = feats[name]
            b, _, h, w = x.shape
            t = F.normalize(adapter(_tokens(x)), dim=-1)
            logits = self.scale * torch.bmm(t, text)  # (B, h*w, 2)
            gaps.append((logits[..., 1] - logits[..., 0]).view(b, h, w))
        return gaps

    def memory_map(self, feats: Features) -> torch.Tensor:
        """(B, h, w) sum over the memory blocks of each patch's min over the memory of
        (1 - cos) (the memory's patch grid is the test image's)."""
        total = None
        for name in self.memory_names:
            x = feats[name]
            b, _, h, w = x.shape
            q = F.normalize(_tokens(x), dim=-1).flatten(0, 1)
            part = (1 - max_cosine(q, self.memory[name])).view(b, h, w)
            total = part if total is None else total + part
        return total

    def training_step(self, batch: Batch) -> torch.Tensor:
        size = tuple(batch.images.shape[-2:])
        with torch.no_grad():
            feats = self.extractor(batch.images)
        target = batch.masks[:, 0]
        loss = torch.zeros((), device=batch.images.device)
        for gap in self.logit_gaps(feats, self._text_of(batch)):
            up = upsample(gap, size)
            p_abnormal, p_normal = torch.sigmoid(up), torch.sigmoid(-up)
            loss = loss + focal_loss(p_normal, p_abnormal, target) + dice_loss(p_abnormal,
                                                                               target)
        return loss

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return self.adapters.parameters()

    def predict(self, batch: Batch) -> Prediction:
        """Maps and image scores; with references and ``image_score=official`` the image
        scores are CLIP's text scores until :meth:`finish` combines them over the test
        set (``extras``: ``text_score`` and ``map_max`` per image)."""
        size = tuple(batch.images.shape[-2:])
        with torch.no_grad():
            feats, embedding = self.extractor.features_and_embedding(batch.images)
            text = self._text_of(batch)
            p = torch.softmax(self.scale * torch.bmm(embedding.unsqueeze(1), text)[:, 0],
                              dim=-1)[:, 1]
            maps = sum(torch.sigmoid(upsample(g, size)) for g in self.logit_gaps(feats, text))
            if self.memory is not None:
                maps = maps + upsample(self.memory_map(feats), size)
            if self.blur_sigma > 0:
                maps = gaussian_blur(maps.unsqueeze(1), self.blur_sigma,
                                     self.blur_border).squeeze(1)
        top = maps.flatten(1).amax(dim=1)
        scores = p
        if self.memory is not None and self.image_score == "per_image":
            scores = 0.5 * (p + top / (len(self.adapter_names) + len(self.memory_names)))
        return Prediction(image_scores=scores, anomaly_maps=maps,
                          extras={"text_score": p, "map_max": top})

    def finish(self, prediction: Prediction) -> Prediction:
        """The official few-shot image score ``0.5 (p + minmax(map maxima))`` over the
        category's whole test set (0 for the second term when every maximum is equal)."""
        if self.memory is None or self.image_score != "official":
            return prediction
        top, p = prediction.extras["map_max"], prediction.extras["text_score"]
        span = top.max() - top.min()
        rel = (top - top.min()) / span if span > 0 else torch.zeros_like(top)
        return Prediction(image_scores=0.5 * (p + rel), anomaly_maps=prediction.anomaly_maps,
                          extras=prediction.extras)

    # ------------------------------------------------------------------ training
    def fit(self, source: Any) -> None:
        """Train the adapters on ``source`` (annotated images) with the shared loop."""
        ctx = self.context
        self._pool = source
        try:
            self.losses = train(
                self, source, self.settings, ctx.device,
                state_path=ctx.out_dir / "training_state.pt", resume=ctx.resume,
                description={**self.description, "dataset": ctx.dataset,
                             "categories": sorted(ctx.class_names)},
                desc=f"train {self.name}")
        finally:
            self._pool = None

    def augment(self, batch: Batch, gen: torch.Generator) -> Batch:
        """Stitching: each image, with probability ``stitch_rate``, becomes a 2 x 2 mosaic
        of four images of its category (a defect type drawn uniformly, ``good``
        included, then an image of it), each the preprocessed image resized to its
        quadrant (antialiased bicubic; masks bilinear then > 0.5), as resizing the
        official code's stitched full-size image does up to the filter."""
        if self.stitch_rate <= 0 or self._pool is None or batch.masks is None:
            return batch
        picked = (torch.rand(len(batch.paths), generator=gen) < self.stitch_rate).nonzero()
        if not len(picked):
            return batch
        pool = _by_category(self._pool.train_records)
        chosen: list[SampleRecord] = []
        for i in picked[:, 0].tolist():
            kinds = pool[batch.categories[i]]
            for _ in range(4):
                records = kinds[int(torch.randint(len(kinds), (1,), generator=gen))][1]
                chosen.append(records[int(torch.randint(len(records), (1,), generator=gen))])
        parts = list(self._pool.batches(chosen, "stitch"))
        images = torch.cat([p.images for p in parts])
        masks = torch.cat([p.masks for p in parts])
        labels = torch.cat([p.labels for p in parts]).view(-1, 4).amax(dim=1)
        idx = picked[:, 0].to(batch.images.device)
        batch.images = batch.images.index_copy(0, idx, _mosaic(images, False))
        batch.masks = batch.masks.index_copy(0, idx, _mosaic(masks, True))
        batch.labels = batch.labels.index_copy(0, idx.to(batch.labels.device),
                                               labels.to(batch.labels.device))
        return batch


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) map -> (B, h*w, C) tokens in row-major grid order."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def _by_category(records: Sequence[SampleRecord]) -> dict[str, list[tuple[str, list]]]:
    """``{category: [(defect type, its records), ...]}``, defect types sorted."""
    out: dict[str, dict[str, list[SampleRecord]]] = {}
    for r in records:
        out.setdefault(r.category, {}).setdefault(r.defect_type, []).append(r)
    return {c: sorted(kinds.items()) for c, kinds in out.items()}


def _mosaic(x: torch.Tensor, binary: bool) -> torch.Tensor:
    """(4n, C, H, W) -> (n, C, H, W): each group of four tiled 2 x 2 (row-major), each
    resized to its quadrant."""
    h, w = x.shape[-2:]
    hs, ws = (h // 2, h - h // 2), (w // 2, w - w // 2)
    quads = x.view(-1, 4, *x.shape[1:])
    rows = []
    for r in range(2):
        cells = []
        for c in range(2):
            q = quads[:, 2 * r + c]
            if binary:
                q = (F.interpolate(q, size=(hs[r], ws[c]), mode="bilinear", antialias=True,
                                   align_corners=False) > 0.5).to(x.dtype)
            else:
                q = F.interpolate(q, size=(hs[r], ws[c]), mode="bicubic", antialias=True,
                                  align_corners=False)
            cells.append(q)
        rows.append(torch.cat(cells, dim=-1))
    return torch.cat(rows, dim=-2)


SCHEMA = {
    "class_names": one_of(*CLASS_NAMES),
    "scale": Key(float, above=0),
    "k_shot": Key(int, lo=0),
    "memory_blocks": Key("any", null=True),
    "image_score": one_of(*IMAGE_SCORES),
    "stitch_rate": Key(float, lo=0, hi=1),
    "prompts": {"normal": Key("names"), "abnormal": Key("names"), "templates": Key("names")},
    "train": TRAIN_SCHEMA,
}


def _blocks(value: Any, key: str) -> list[int]:
    items = value if isinstance(value, list | tuple) else [value]
    if not items or any(isinstance(b, bool) or not isinstance(b, int) for b in items):
        raise ConfigError(f"{key}={value!r} must name transformer blocks by index (e.g. "
                          "[5, 11, 17, 23]; -1 = the last).")
    return list(items)


@register("aprilgan", SCHEMA, learning="auxiliary", test_time=TEST_TIME)
def _build(method_cfg: Mapping[str, Any], backbone_cfg: Mapping[str, Any],
           layers_cfg: Mapping[str, Any], seed: int) -> AprilGan:
    kind = backbone_cfg.get("kind", "cnn")
    if kind != "clip":
        raise ConfigError(
            f"method=aprilgan compares image tokens with text prompts, so it needs a CLIP "
            f"backbone, but backbone={backbone_cfg.get('name')} is a {kind} backbone "
            "(backbone.kind=" + str(kind) + "): use backbone=clip_vit_l14_336 (the default of "
            "method=aprilgan) or another CLIP backbone with layers.blocks=[...].")
    adapter = _blocks(layers_cfg.get("blocks"), "layers.blocks")
    memory = (adapter if method_cfg["memory_blocks"] is None
              else _blocks(method_cfg["memory_blocks"], "method.memory_blocks"))
    extractor = build_extractor(backbone_cfg, {**layers_cfg, "blocks": adapter + memory}, seed)
    n = extractor.n_blocks
    prompts = method_cfg["prompts"]
    for part in ("normal", "abnormal", "templates"):
        words = prompts[part] if isinstance(prompts[part], list) else [prompts[part]]
        if not words or any(("{}" not in str(w)) for w in words):
            raise ConfigError(f"method.prompts.{part} must be a list of texts, each with one "
                              "'{}' where the " + ("state" if part == "templates" else
                                                   "class name") + " goes.")
    return AprilGan(
        extractor,
        adapter_blocks=sorted({b % n for b in adapter}),
        memory_blocks=sorted({b % n for b in memory}),
        prompts={k: list(v) if isinstance(v, list) else [v] for k, v in prompts.items()},
        class_names=str(method_cfg["class_names"]),
        scale=float(method_cfg["scale"]),
        image_score=str(method_cfg["image_score"]),
        stitch_rate=float(method_cfg["stitch_rate"]),
        settings=TrainSettings.from_config(method_cfg["train"]),
        description={"method": "aprilgan", "weights": extractor.weights_tag,
                     "layers": extractor.tag,
                     "config": {k: v for k, v in method_cfg.items() if k not in TEST_TIME}},
        seed=seed,
        blur_sigma=float(method_cfg["blur_sigma"]),
        blur_border=str(method_cfg["blur_border"]),
    )
