"""WinCLIP and WinCLIP+ (Jeong et al., CVPR 2023): zero- and few-shot detection with CLIP.

Zero-shot (``k_shot=0``). A compositional prompt ensemble describes the category (its
class name from the dataset) as normal and as anomalous: every state word (``{}``,
``flawless {}``, ... / ``damaged {}``, ...) in every template (``a photo of a {}.``, ...);
each group's text embeddings are averaged as they come out of the text tower, then the
two averages are compared by cosine. An embedding ``f`` scores
``softmax([cos(f, normal), cos(f, anomalous)] / temperature)[anomalous]``. The image
score is the score of the image embedding (the last block's class token through
``ln_post`` and the projection). For the map, every k x k window of patches (stride 1,
``scales`` = 2 and 3) is embedded on its own: the class token and the window's patch
tokens, with their position embeddings, through the whole tower
(:meth:`~anomaly_bench.backbones.clip.ClipBackbone.encode_windows`). A patch's score at
one scale is the harmonic mean of the scores of the windows covering it; the zero-shot
map is the harmonic mean of the image score (the full-image scale) and the scale maps.

Few-shot (``k_shot`` > 0, WinCLIP+). The k reference images of the category (normal,
preprocessed as the test images are) give a memory of patch tokens (the selected blocks'
patch tokens through ``ln_post``; the last block by default) and of window embeddings
per scale. A test token's association score is ``min over the memory (1 - cos) / 2``;
window scores are aggregated per patch harmonically as above. The few-shot map is the
mean of the patch map (mean over the selected blocks) and the window maps; the final map
is the mean of the zero- and few-shot maps, the image score the mean of the zero-shot
image score and the few-shot map's maximum.

Maps are upsampled bilinearly (corners not aligned) from the patch grid to the image,
then blurred with ``blur_sigma`` (0: none, as the reference). This is what anomalib 2.7's
``WinClipModel`` computes, except that there every window embedding comes out the same:
its window pass hands open_clip's batch-first transformer a sequence-first tensor, so
attention runs across windows (``benchmarks/vs_anomalib_winclip.py`` shows both).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from anomaly_bench.backbones.clip import ClipBackbone
from anomaly_bench.errors import ConfigError
from anomaly_bench.methods.base import AnomalyMethod, MethodContext, register
from anomaly_bench.methods.common import build_extractor
from anomaly_bench.ops.blur import gaussian_blur
from anomaly_bench.ops.knn import max_cosine
from anomaly_bench.schema import Key
from anomaly_bench.types import Batch, Prediction


def window_indices(grid: tuple[int, int], size: int) -> torch.Tensor:
    """(S, size*size) row-major patch indices of every size x size window at stride 1 on
    an h x w grid, windows in row-major order of their top-left patch."""
    h, w = grid
    if not 1 <= size <= min(h, w):
        raise ConfigError(f"method.scales holds {size}: windows must fit the {h} x {w} patch "
                          "grid of the backbone.")
    idx = torch.arange(h * w).view(1, 1, h, w).float()
    return F.unfold(idx, size).long()[0].T  # unfold: columns = windows, rows = members


def coverage(grid: tuple[int, int], windows: torch.Tensor) -> torch.Tensor:
    """(h*w, S) 0/1 matrix: patch p lies in window s."""
    out = torch.zeros(grid[0] * grid[1], len(windows))
    out.scatter_(0, windows.T, 1.0)
    return out


def harmonic_per_patch(scores: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """(B, h*w) harmonic mean, per patch, of the (B, S) scores of the windows covering it.

    Scores are positive (a softmax probability or a cosine distance); one of exactly 0
    makes its patches 0, as the harmonic mean's limit (clamped to the smallest normal
    float so the product with the 0/1 coverage stays finite)."""
    inv = 1.0 / scores.clamp_min(torch.finfo(scores.dtype).tiny)
    return cover.sum(1) / (inv @ cover.T)


def prompt_ensemble(class_name: str, states: Sequence[str],
                    templates: Sequence[str]) -> list[str]:
    """Every state (with the class name) in every template, states outermost."""
    return [t.format(s.format(class_name)) for s in states for t in templates]


class WinClip(AnomalyMethod):
    name = "winclip"

    def __init__(self, extractor: ClipBackbone, *, patch_blocks: Sequence[str],
                 scales: Sequence[int], temperature: float, prompts: Mapping[str, Sequence[str]],
                 blur_sigma: float, blur_border: str) -> None:
        super().__init__()
        self.extractor = extractor
        self.patch_blocks = list(patch_blocks)
        self.last = f"block{extractor.n_blocks - 1}"
        self.scales = [int(s) for s in scales]
        self.temperature = float(temperature)
        self.prompts = {k: list(v) for k, v in prompts.items()}
        self.blur_sigma = blur_sigma
        self.blur_border = blur_border
        self._texts: dict[str, torch.Tensor] = {}  # class name -> (2, D) text embeddings
        for i, size in enumerate(self.scales):
            win = window_indices(extractor.grid, size)
            self.register_buffer(f"windows{i}", win, persistent=False)
            self.register_buffer(f"cover{i}", coverage(extractor.grid, win), persistent=False)
        # what setup derives for the tested category (never saved: recomputed each time)
        self.register_buffer("text", None, persistent=False)
        self.memory_patches: list[torch.Tensor] = []  # per patch block: (k*h*w, C), unit
        self.memory_windows: list[torch.Tensor] = []  # per scale: (k*S, D), unit

    def _windows(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"windows{i}"), getattr(self, f"cover{i}")

    # ------------------------------------------------------------------ lifecycle
    def setup(self, context: MethodContext) -> None:
        """Text embeddings of the context's class name; with references, the few-shot
        memory of their patch tokens and window embeddings."""
        super().setup(context)
        if context.class_name:
            self.text = self.text_embeddings(context.class_name).to(context.device)
        self.memory_patches, self.memory_windows = [], []
        if context.references is not None:
            parts = [self.embed(batch.images) for batch in context.references]
            _, patches, windows = zip(*parts, strict=True)
            self.memory_patches = [torch.cat([p[j] for p in patches]).flatten(0, 1)
                                   for j in range(len(self.patch_blocks))]
            self.memory_windows = [torch.cat([w[i] for w in windows]).flatten(0, 1)
                                   for i in range(len(self.scales))]

    def fit(self, batches: Iterable[Batch]) -> None:
        """Nothing to learn: WinCLIP is zero-shot (few-shot references come in setup)."""

    @torch.no_grad()
    def text_embeddings(self, class_name: str) -> torch.Tensor:
        """(2, D) unit normal and anomalous embeddings of the prompt ensemble: each group's
        text embeddings averaged as the text tower gives them, then normalised."""
        if class_name not in self._texts:
            groups = [prompt_ensemble(class_name, self.prompts[key], self.prompts["templates"])
                      for key in ("normal_states", "anomalous_states")]
            mean = [self.extractor.text_features(g).mean(0) for g in groups]
            self._texts[class_name] = F.normalize(torch.stack(mean), dim=-1)
        return self._texts[class_name]

    # ------------------------------------------------------------------ maths
    @torch.no_grad()
    def embed(self, images: torch.Tensor
              ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Unit image embeddings (B, D); per patch block the unit ``ln_post`` patch
        tokens (B, h*w, C); per scale the unit window embeddings (B, S, D)."""
        feats = self.extractor(images)
        image = self.extractor.embed_class_tokens(feats.class_tokens[self.last])
        patches = [F.normalize(self.extractor.final_norm(feats[b].flatten(2).transpose(1, 2)),
                               dim=-1) for b in self.patch_blocks]
        b = len(images)
        windows = [self.extractor.encode_windows(images, self._windows(i)[0].expand(b, -1, -1))
                   for i in range(len(self.scales))]
        return image, patches, windows

    def anomalous(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Anomalous probability of unit embeddings (..., D) against the class prompts."""
        if self.text is None:
            raise ConfigError("winclip has no class name to prompt with: the dataset gave "
                              "none (setup with a category's context comes first).")
        return ((embeddings @ self.text.T) / self.temperature).softmax(dim=-1)[..., 1]

    @staticmethod
    def association(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """(B, N) min over the unit memory rows of (1 - cos) / 2, per unit query (B, N, C)
        (chunked products: :func:`~anomaly_bench.ops.knn.max_cosine`)."""
        return (1 - max_cosine(queries.flatten(0, 1), memory).view(queries.shape[:2])) / 2

    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        images = batch.images
        grid = self.extractor.grid
        image, patches, windows = self.embed(images)
        score = self.anomalous(image)  # (B,)
        scale_maps = [harmonic_per_patch(self.anomalous(w), self._windows(i)[1])
                      for i, w in enumerate(windows)]
        full = score[:, None].expand(-1, grid[0] * grid[1])
        zero = (len(scale_maps) + 1) / sum(1 / m for m in [full, *scale_maps])
        patch_map = zero
        if self.memory_windows:
            patch_level = torch.stack([self.association(p, m) for p, m in
                                       zip(patches, self.memory_patches, strict=True)]).mean(0)
            window_level = [harmonic_per_patch(self.association(w, m), self._windows(i)[1])
                            for i, (w, m) in enumerate(zip(windows, self.memory_windows,
                                                           strict=True))]
            few = torch.stack([patch_level, *window_level]).mean(0)
            patch_map = (zero + few) / 2
            score = (score + few.amax(dim=1)) / 2
        maps = F.interpolate(patch_map.view(-1, 1, *grid), size=tuple(images.shape[-2:]),
                             mode="bilinear", align_corners=False)
        maps = gaussian_blur(maps, self.blur_sigma, self.blur_border).squeeze(1)
        return Prediction(image_scores=score, anomaly_maps=maps)


SCHEMA = {
    "k_shot": Key(int, lo=0),
    "scales": Key("any"),
    "temperature": Key(float, above=0),
    "prompts": {"normal_states": Key("names"), "anomalous_states": Key("names"),
                "templates": Key("names")},
}


@register("winclip", SCHEMA, learning="zero_shot", test_time=("k_shot",))
def _build(method_cfg: Mapping[str, Any], backbone_cfg: Mapping[str, Any],
           layers_cfg: Mapping[str, Any], seed: int) -> WinClip:
    if backbone_cfg.get("kind", "cnn") != "clip":
        raise ConfigError(
            f"method=winclip compares image windows with text prompts in CLIP's joint space, "
            f"but backbone {backbone_cfg.get('name')} is kind={backbone_cfg.get('kind', 'cnn')}:"
            " choose a CLIP backbone (e.g. backbone=clip_vit_b16_plus_240, WinCLIP's own) or "
            "leave backbone out.")
    scales = method_cfg["scales"]
    if not isinstance(scales, list | tuple) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in scales):
        raise ConfigError(f"method.scales={scales!r} must be a list of window sizes in patches "
                          "(positive integers, e.g. [2, 3]).")
    for key in ("normal_states", "anomalous_states"):
        bad = [s for s in method_cfg["prompts"][key] if s.count("{}") != 1]
        if bad:
            raise ConfigError(f"method.prompts.{key} holds {bad[0]!r}: every state needs one "
                              "'{}' where the class name goes.")
    bad = [t for t in method_cfg["prompts"]["templates"] if t.count("{}") != 1]
    if bad:
        raise ConfigError(f"method.prompts.templates holds {bad[0]!r}: every template needs "
                          "one '{}' where the state goes.")
    blocks = list(layers_cfg.get("blocks") or [-1])
    # the last block always runs: its class token is the image embedding
    extractor = build_extractor(backbone_cfg, {**layers_cfg, "blocks": [*blocks, -1]}, seed)
    n = extractor.n_blocks
    return WinClip(extractor, patch_blocks=[f"block{i}" for i in sorted({b % n for b in blocks})],
                   scales=scales, temperature=float(method_cfg["temperature"]),
                   prompts=method_cfg["prompts"], blur_sigma=float(method_cfg["blur_sigma"]),
                   blur_border=str(method_cfg["blur_border"]))
