"""anomaly-bench PatchCore side by side with the official PatchCore code, stage by stage.

The official code is amazon-science/patchcore-inspection (Roth et al., CVPR 2022), used
from a checkout given by ``--official PATH`` (``PATH/src`` is put on ``sys.path`` and its
``patchcore`` package imported; nothing of it is copied here). Both systems get the very
same preprocessed tensors (our loader: resize 256, centre crop 224, ImageNet
normalisation) and the same seeded random WideResNet50-2 weights: a timm
``wide_resnet50_2`` built under ``torch.manual_seed(seed)`` is saved once, loaded by our
extractor through ``backbone.weights=FILE`` / ``backbone.pretrained=false`` and, with a
strict key-and-shape check, into the torchvision model that the official
``patchcore.backbones.load("wideresnet50")`` builds (its expression is evaluated with
``pretrained=False``: no ImageNet download, the weights are replaced anyway). The
official model is configured as in its README / ``sample_training.sh``: layer2 + layer3,
``pretrain_embed_dimension = target_embed_dimension = 1024``, patch size 3,
``ApproximateGreedyCoresetSampler(0.1)`` (128-d projection, 10 starting points),
``NearestNeighbourScorer`` with ``FaissNN`` (``IndexFlatL2``), ``anomaly_score_num_nn=1``.

Printed (markdown), per synthetic category (default a texture and an object), with
``--n-train`` training images and the whole test set:

0. The official backbone: which forward passes run with the network in train mode, and
   which BatchNorm running statistics its ``PatchCore.load()`` changes
   (``NetworkFeatureAggregator.feature_dimensions`` pushes ``torch.ones(1, 3, 224, 224)``
   through the freshly built, still train-mode backbone up to the last extracted layer).
   Stages 1-4 use the official model in that post-``load()`` state, as the official code
   would; a second official model whose state dict is restored after ``load()``
   ("untouched BN") quantifies the effect.
1. Patch embeddings: official ``PatchCore._embed`` vs our ``PatchCore.embed`` on the test
   images: largest per-patch relative L2 difference and largest element difference
   relative to the largest element.
2. Coreset: the official ``ApproximateGreedyCoresetSampler`` vs ``ops.coreset.
   greedy_coreset`` on the SAME 128-d projected features (the official ``torch.nn.Linear``
   projection of the official training embeddings) and the SAME 10 starting points
   (the official ``np.random.choice`` draw, handed to ours by replacing
   ``coreset._start_points`` for the call), in float64 and float32; also ours started
   from the official first pick via the public ``first=`` argument. Identical prefix
   (same picks in the same order) and set overlap.
3. Scoring: the official bank and test embeddings, scored by the official
   ``NearestNeighbourScorer`` (faiss ``IndexFlatL2`` gives SQUARED L2 distances, no square
   root is taken anywhere; with num_nn=1 the patch score is the squared distance to the
   nearest bank entry, the image score its maximum over patches) and by our ``KnnIndex``
   search + ``reweighted_scores`` with ``num_neighbors=1`` (Euclidean distance, maximum
   over patches); both against an exact float64 reference. Spearman of image scores and
   largest absolute difference after min-max normalisation.
4. Maps: the official ``RescaleSegmentor`` (bilinear upsampling, then
   ``scipy.ndimage.gaussian_filter(sigma=4)``, scipy's default border mode ``reflect``)
   vs our map step on the same official patch-score grids; with every border our
   ``ops.blur.gaussian_blur`` offers (its ``border=`` argument, if present when run).
5. End to end: each system's own fit and predict (ours with ``method.num_neighbors=1``),
   image AUROC and agreement of image scores and maps.

Run (the benchmark venv: anomaly-bench installed plus faiss-cpu, scipy, timm, and the
official code's imports such as tqdm)::

    python benchmarks/vs_patchcore_official.py --official /path/to/patchcore-inspection \\
        [--categories stripes rotated_part] [--n-train 16] [--data-root data] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from vs_anomalib import CATEGORIES, machine_line, make_weights  # the same inputs as that benchmark

BATCH = 8
LAYERS = ["layer2", "layer3"]
IMAGE = 224
SIGMA = 4.0
CPU = torch.device("cpu")


# ---------------------------------------------------------------------- shared inputs
def load_split(root: Path, category: str, n_train: int):
    """(train batches, test batches) of our loader: 256 resize, 224 crop, normalised."""
    from anomaly_bench.backbones.base import IMAGENET_MEAN, IMAGENET_STD
    from anomaly_bench.data import Preprocess, get_layout, make_loader

    layout = get_layout("mvtec" if (root / category / "ground_truth").is_dir() else "folder")
    split = layout.split(root, category)
    pre = Preprocess(size=256, crop=IMAGE, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     resample="bilinear", mask_resample="nearest")

    def batches(records):
        return list(make_loader(records, pre, BATCH, 0, with_masks=split.has_masks))

    return batches(split.train[:n_train]), batches(split.test)


# ---------------------------------------------------------------------- the official side
def import_official(path: Path):
    """The official ``patchcore`` package from the checkout at ``path``."""
    src = path / "src"
    if not (src / "patchcore" / "patchcore.py").is_file():
        sys.exit(f"{src}/patchcore/patchcore.py not found: --official must be a checkout of "
                 "amazon-science/patchcore-inspection")
    sys.path.insert(0, str(src))
    import patchcore.backbones
    import patchcore.common
    import patchcore.patchcore
    import patchcore.sampler

    return patchcore


def official_revision(path: Path) -> str:
    try:
        rev = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "no git metadata"
    version = path / "src" / "patchcore" / "VERSION"
    return f"{version.read_text().strip() if version.is_file() else '?'} ({rev})"


def official_backbone(pc, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The network of ``patchcore.backbones.load("wideresnet50")`` with our weights."""
    expr = pc.backbones._BACKBONES["wideresnet50"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision: "pretrained" is deprecated
        model = eval(expr.replace("pretrained=True", "pretrained=False"), vars(pc.backbones))
    own = model.state_dict()
    missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or extra or shapes:
        sys.exit(f"weights do not fit the official backbone: missing {missing[:3]}, "
                 f"unexpected {extra[:3]}, shape mismatch {shapes[:3]}")
    model.load_state_dict(state, strict=True)
    model.name, model.seed = "wideresnet50", None
    return model


class ModeLog:
    """Forward pre-hook on a network: every call's phase, train flag and input."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.phase = "?"
        self.calls: list[tuple[str, bool, tuple[int, ...], bool]] = []
        self.handle = net.register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        x = args[0]
        self.calls.append((self.phase, module.training, tuple(x.shape), bool((x == 1).all())))


def seed_official(seed: int) -> None:
    """Seed the global RNGs the official sampler draws from, as its ``fix_seeds`` does:
    torch (the projection's initialisation) and NumPy's legacy one (starting points)."""
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002


def official_model(pc, backbone: torch.nn.Module, sampler, log: ModeLog | None = None):
    """``PatchCore.load()`` as ``bin/run_patchcore.py`` calls it (README settings)."""
    model = pc.patchcore.PatchCore(CPU)
    if log is not None:
        log.phase = "load()"
    model.load(backbone=backbone, layers_to_extract_from=LAYERS, device=CPU,
               input_shape=(3, IMAGE, IMAGE), pretrain_embed_dimension=1024,
               target_embed_dimension=1024, patchsize=3, patchstride=1,
               anomaly_score_num_nn=1, featuresampler=sampler,
               nn_method=pc.common.FaissNN(False, torch.get_num_threads()))
    return model


def official_embed(model, batches) -> torch.Tensor:
    """(N * h * w, D) official embeddings (``_embed`` returns a list of patch rows)."""
    return torch.cat([torch.from_numpy(np.asarray(model._embed(b.images))) for b in batches])


def bn_changes(before: dict[str, torch.Tensor], net: torch.nn.Module) -> list[dict]:
    """Per stage: BatchNorm layers whose running statistics differ from ``before``."""
    rows: dict[str, dict] = {}
    for name, mod in net.named_modules():
        if not isinstance(mod, torch.nn.BatchNorm2d):
            continue
        stage = name.split(".")[0] if name.startswith("layer") else "stem"
        r = rows.setdefault(stage, {"stage": stage, "n": 0, "changed": 0, "mean": 0.0,
                                    "var": 0.0, "tracked": set()})
        dm = float((mod.running_mean - before[f"{name}.running_mean"]).abs().max())
        dv = float((mod.running_var - before[f"{name}.running_var"]).abs().max())
        r["n"] += 1
        r["changed"] += int(dm > 0 or dv > 0)
        r["mean"], r["var"] = max(r["mean"], dm), max(r["var"], dv)
        r["tracked"].add(int(mod.num_batches_tracked))
    return list(rows.values())


# ---------------------------------------------------------------------- our side
def our_model(weights: Path, seed: int):
    from anomaly_bench.methods import build_method

    backbone = {"name": "wide_resnet50_2", "hub_tag": "tv_in1k", "pretrained": False,
                "weights": str(weights)}
    layers = {"layer1": None, "layer2": -1, "layer3": -1, "layer4": None}
    cfg = {"name": "patchcore", "coreset_ratio": 0.1, "num_neighbors": 1}
    return build_method(cfg, backbone, layers, seed=seed).eval()


@contextlib.contextmanager
def start_points(points: np.ndarray):
    """Make ``ops.coreset`` use these starting points (instead of its seeded draw)."""
    from anomaly_bench.ops import coreset

    original = coreset._start_points

    def fixed(n, n_starts, seed, device):
        return torch.as_tensor(points, dtype=torch.long, device=device)

    coreset._start_points = fixed
    try:
        yield
    finally:
        coreset._start_points = original


# ---------------------------------------------------------------------- figures
def rel_diff(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(largest per-row ||a - ref|| / ||ref||, largest |a - ref| / largest |ref|)."""
    a, ref = a.double(), ref.double()
    rows = ((a - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-300)).max()
    return float(rows), float((a - ref).abs().max() / ref.abs().max())


def minmax(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return (x - x.min()) / (x.max() - x.min())


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Spearman of ``a`` and ``b`` and their largest difference after min-max scaling."""
    from scipy.stats import spearmanr

    rho = float(spearmanr(a.double().numpy(), b.double().numpy()).statistic)
    return rho, float((minmax(a) - minmax(b)).abs().max())


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    from scipy.stats import rankdata

    ranks = rankdata(scores.double().numpy())
    pos = labels.numpy() > 0
    n_p, n_n = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_p * (n_p + 1) / 2) / (n_p * n_n))


def prefix_overlap(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    a, b = torch.as_tensor(a).long().cpu(), torch.as_tensor(b).long().cpu()
    n = min(len(a), len(b))
    prefix = int((a[:n] == b[:n]).cumprod(0).sum())
    return prefix, len(set(a.tolist()) & set(b.tolist())) / max(len(a), len(b))


def map_diff(a: torch.Tensor, ref: torch.Tensor, margin: int) -> tuple[float, float]:
    """Largest |a - ref| over all pixels and over pixels >= ``margin`` from the edge, both
    relative to the largest |ref|."""
    d = (a.double() - ref.double()).abs()
    scale = float(ref.double().abs().max())
    return float(d.max()) / scale, float(d[:, margin:-margin, margin:-margin].max()) / scale


# ---------------------------------------------------------------------- one category
def run_category(pc, weights: Path, root: Path, category: str, n_train: int,
                 seed: int) -> dict:
    from scipy import ndimage

    from anomaly_bench.methods import method_defaults
    from anomaly_bench.methods.common import to_image_maps
    from anomaly_bench.methods.patchcore import reweighted_scores
    from anomaly_bench.ops.blur import BORDERS, gaussian_blur
    from anomaly_bench.ops.coreset import coreset_size, greedy_coreset
    from anomaly_bench.ops.knn import KnnIndex

    out: dict = {"category": category, "kind": CATEGORIES.get(category, "?")}
    train, test = load_split(root, category, n_train)
    labels = torch.cat([b.labels for b in test])
    out["n_train"], out["n_test"] = sum(len(b.images) for b in train), len(labels)
    state = torch.load(weights, map_location="cpu")

    # -- 0. the official model as the official code leaves it, and one with BN untouched
    net = official_backbone(pc, state)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out["train_flag_before_load"] = net.training
    log = ModeLog(net)
    sampler = pc.sampler.ApproximateGreedyCoresetSampler(0.1, CPU)
    official = official_model(pc, net, sampler, log)
    out["bn"] = bn_changes(before, net)
    probe = "layer3.5.bn3"
    out["probe"] = (probe, float(before[f"{probe}.running_mean"].abs().max()),
                    float(dict(net.named_modules())[probe].running_mean.abs().max()))

    net0 = official_backbone(pc, state)
    untouched = official_model(pc, net0, pc.sampler.ApproximateGreedyCoresetSampler(0.1, CPU))
    net0.load_state_dict(state, strict=True)  # undo load()'s train-mode pass

    # -- 1. embeddings of the test images
    ours = our_model(weights, seed)
    t0 = time.perf_counter()
    log.phase = "_embed (test)"
    emb_off = official_embed(official, test)
    emb_raw = official_embed(untouched, test)
    emb_ours = torch.cat([ours.embed(b.images).reshape(-1, ours.embed_dim) for b in test])
    out["embed"] = {"ours vs official (after its load())": rel_diff(emb_ours, emb_off),
                    "ours vs official, BN untouched": rel_diff(emb_ours, emb_raw),
                    "official after load() vs BN untouched": rel_diff(emb_off, emb_raw)}
    out["embed_s"] = time.perf_counter() - t0

    # -- 2. coreset on the official projected training features
    log.phase = "_embed (train)"
    feats = official_embed(official, train)
    n = len(feats)
    k = coreset_size(n, 0.1)
    seed_official(seed)  # what the official fit draws, in the order it draws it
    reduced = sampler._reduce_features(feats).detach()
    starts = np.random.choice(n, sampler.number_of_starting_points, replace=False)  # noqa: NPY002
    core = {"n": n, "k": k, "official_k": int(n * sampler.percentage), "rows": []}
    picks = {}
    for name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        seed_official(seed)
        t0 = time.perf_counter()
        theirs = torch.from_numpy(sampler._compute_greedy_coreset_indices(reduced.to(dtype)))
        t_theirs = time.perf_counter() - t0
        with start_points(starts):
            t0 = time.perf_counter()
            mine = greedy_coreset(reduced, k, projection_dim=None, n_starts=len(starts),
                                  seed=seed, dtype=dtype)
            t_mine = time.perf_counter() - t0
        picks[name] = theirs
        core["rows"].append((f"{name}, same 10 starting points", *prefix_overlap(mine, theirs),
                             t_mine, t_theirs))
    mine = greedy_coreset(reduced, k, projection_dim=None, dtype=torch.float64,
                          first=int(picks["float64"][0]))
    core["rows"].append(("float64, `first=` the official first pick (no mean-distance "
                         "term)", *prefix_overlap(mine, picks["float64"]), float("nan"),
                         float("nan")))
    out["coreset"] = core

    # -- 3. scoring: the official fit (same seeds as above: same projection, same starts)
    seed_official(seed)
    log.phase = "fit()"
    official.fit([b.images for b in train])
    bank = torch.from_numpy(official.anomaly_scorer.detection_features)
    out["bank_reproduced"] = bool(torch.equal(bank, feats[picks["float32"]]))
    log.phase = "_predict (test)"
    off_scores, off_maps = [], []
    for b in test:
        s, m = official._predict(b.images)
        off_scores += s
        off_maps += m
    off_scores = torch.tensor(np.asarray(off_scores))
    off_maps = torch.from_numpy(np.stack(off_maps))
    p = emb_off.shape[0] // len(labels)
    h = w = round(p ** 0.5)
    off_patch, _, off_nn = official.anomaly_scorer.predict([emb_off.numpy()])
    off_patch = torch.from_numpy(off_patch).view(-1, p)
    off_nn = torch.from_numpy(off_nn[:, 0]).view(-1, p)

    index = KnnIndex(bank)
    flat = emb_off.view(-1, p, emb_off.shape[1])
    nn = index.search(emb_off, 1)
    our_patch = nn.distances.view(-1, p)
    our_nn = nn.indices.view(-1, p)
    our_scores = reweighted_scores(our_patch, our_nn, flat, index, 1)
    bank64 = bank.double()
    centre = bank64.mean(dim=0)
    ref_patch = torch.cat([torch.cdist(q.double() - centre, bank64 - centre).amin(dim=1)
                           for q in emb_off.split(4096)]).view(-1, p)
    ref_scores = ref_patch.amax(dim=1)
    out["patch"] = {
        "official (squared) vs float64 squared": float(
            ((off_patch.double() - ref_patch ** 2).abs() / (ref_patch ** 2)).max()),
        "ours vs float64": float(((our_patch.double() - ref_patch).abs() / ref_patch).max()),
        "nn_same": float((our_nn == off_nn).double().mean()),
        "official_vs_predict": float((off_patch.amax(dim=1) - off_scores).abs().max()),
    }
    out["scores"] = {
        "ours vs official": agreement(our_scores, off_scores),
        "ours squared vs official": agreement(our_scores ** 2, off_scores),
        "ours vs float64 Euclidean": agreement(our_scores, ref_scores),
        "sqrt(official) vs float64 Euclidean": agreement(off_scores.sqrt(), ref_scores),
    }

    # -- 4. maps on the same official patch-score grids
    grid = off_patch.view(-1, h, w)
    size = (IMAGE, IMAGE)
    margin = int(4 * SIGMA + 0.5) + 1
    up = F.interpolate(grid.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
    default = method_defaults("patchcore")["blur_border"]
    maps = {f"ours, `to_image_maps` as PatchCore calls it (blur_border={default!r})":
            to_image_maps(grid, size, SIGMA, default)[1]}
    for border in (b for b in BORDERS if b != default):
        maps[f"ours, `gaussian_blur(border={border!r})`"] = gaussian_blur(
            up, SIGMA, border).squeeze(1)
    out["border_note"] = (f"PatchCore's `method.blur_border` defaults to {default!r}; "
                          f"`ops.blur.gaussian_blur` offers {', '.join(BORDERS)}.")
    up_np = up.squeeze(1).numpy()
    maps["scipy `gaussian_filter(mode='mirror')` (reference)"] = torch.from_numpy(
        np.stack([ndimage.gaussian_filter(m, sigma=SIGMA, mode="mirror") for m in up_np]))
    maps["official `convert_to_segmentation` again (sanity)"] = torch.from_numpy(np.stack(
        official.anomaly_segmentor.convert_to_segmentation(grid.numpy())))
    out["maps"] = {label: map_diff(m, off_maps, margin) for label, m in maps.items()}
    out["margin"] = margin

    # -- 5. end to end: each system's own fit and predict
    seed_official(seed)
    untouched.fit([b.images for b in train])
    raw_scores = torch.tensor(np.asarray(
        [s for b in test for s in untouched._predict(b.images)[0]]))
    ours.fit(iter(train))
    e2e_scores, e2e_maps = [], []
    for b in test:
        pred = ours.predict(b)
        e2e_scores.append(pred.image_scores)
        e2e_maps.append(pred.anomaly_maps)
    e2e_scores, e2e_maps = torch.cat(e2e_scores), torch.cat(e2e_maps)
    out["e2e"] = {
        "auroc": {"official": auroc(off_scores, labels),
                  "official, BN untouched": auroc(raw_scores, labels),
                  "ours (num_neighbors=1)": auroc(e2e_scores, labels)},
        "agree": {"ours vs official": agreement(e2e_scores, off_scores),
                  "ours squared vs official": agreement(e2e_scores ** 2, off_scores),
                  "ours vs official, BN untouched": agreement(e2e_scores, raw_scores),
                  "official vs official, BN untouched": agreement(off_scores, raw_scores)},
        "maps": float((minmax(e2e_maps) - minmax(off_maps)).abs().max()),
        "bank": (len(ours.memory_bank), len(bank)),
    }
    log.handle.remove()
    out["calls"] = log.calls
    return out


# ---------------------------------------------------------------------- report
def report(runs: list[dict], official_path: Path, args, seconds: float) -> str:
    import faiss
    import scipy
    import timm
    import torchvision

    names = ", ".join(f"synthetic/{r['category']} ({r['kind']})" for r in runs)
    lines = [
        "# anomaly-bench PatchCore vs the official PatchCore (patchcore-inspection)",
        "",
        f"{machine_line()}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
        f"faiss {faiss.__version__}, scipy {scipy.__version__}; official code "
        f"{official_revision(official_path)}; data: {names}; {runs[0]['n_train']} training "
        f"images, {runs[0]['n_test']} test images; WideResNet50-2 layer2 + layer3 with the same "
        f"seeded random weights (seed {args.seed}) in both; 256 resize, 224 crop; "
        f"{seconds:.0f} s in all.",
        "",
        "## 0. The official backbone's mode and BatchNorm statistics",
        "",
        "| data | phase | forward calls | in train mode | input |",
        "|---|---|---:|---:|---|",
    ]
    for r in runs:
        phases: dict[str, list] = {}
        for phase, training, shape, ones in r["calls"]:
            phases.setdefault(phase, []).append((training, shape, ones))
        for phase, calls in phases.items():
            inputs = sorted({("torch.ones " if ones else "images ") + "x".join(map(str, s))
                             for _, s, ones in calls})
            lines.append(f"| {r['category']} | {phase} | {len(calls)} | "
                         f"{sum(t for t, _, _ in calls)} | {', '.join(inputs)} |")
    lines += ["", "BatchNorm running statistics of the official backbone after `PatchCore.load()` "
              "vs before it (the same state dict was loaded into it just before):", "",
              "| data | stage | BN layers | changed | max abs change running_mean | "
              "max abs change running_var | num_batches_tracked after |",
              "|---|---|---:|---:|---:|---:|---|"]
    for r in runs:
        for row in r["bn"]:
            lines.append(f"| {r['category']} | {row['stage']} | {row['n']} | {row['changed']} | "
                         f"{row['mean']:.3e} | {row['var']:.3e} | "
                         f"{', '.join(map(str, sorted(row['tracked'])))} |")
    for r in runs:
        name, b, a = r["probe"]
        lines.append(f"\n{r['category']}: backbone in train mode before `load()`: "
                     f"{r['train_flag_before_load']}; {name}.running_mean max |value| "
                     f"{b:.3e} before, {a:.3e} after; changed: {a != b}.")

    lines += ["", "## 1. Patch embeddings (test images, 1024-d, 28 x 28 per image)", "",
              "| data | compared | max per-patch relative L2 diff | max abs diff / max abs "
              "value |", "|---|---|---:|---:|"]
    for r in runs:
        for label, (row, elem) in r["embed"].items():
            lines.append(f"| {r['category']} | {label} | {row:.3e} | {elem:.3e} |")

    lines += ["", "## 2. Coreset (official projected training features, 10%)", "",
              "| data | ours vs official | N | k | identical prefix | set overlap | ours s | "
              "official s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        c = r["coreset"]
        for label, prefix, overlap, t_mine, t_theirs in c["rows"]:
            ts = "| |" if t_mine != t_mine else f"| {t_mine:.2f} | {t_theirs:.2f} |"
            lines.append(f"| {r['category']} | {label} | {c['n']} | {c['k']} | "
                         f"{prefix}/{c['k']} | {overlap:.4f} {ts}")
    for r in runs:
        c = r["coreset"]
        lines.append(f"\n{r['category']}: official size int(N * 0.1) = {c['official_k']}, ours "
                     f"`coreset_size` = {c['k']}; the official `fit()` bank equals the "
                     f"float32 official selection above: {r['bank_reproduced']}.")

    lines += ["", "## 3. Scoring: official bank and test embeddings, num_nn = 1", "",
              "| data | image scores compared | Spearman | max abs diff (min-max normalised) |",
              "|---|---|---:|---:|"]
    for r in runs:
        for label, (rho, diff) in r["scores"].items():
            lines.append(f"| {r['category']} | {label} | {rho:.6f} | {diff:.3e} |")
    lines += ["", "| data | max rel. error, official patch scores vs float64 squared distance "
              "| max rel. error, ours vs float64 distance | same nearest bank entry | "
              "official max-patch vs its `_predict` image score |", "|---|---:|---:|---:|---:|"]
    for r in runs:
        pt = r["patch"]
        lines.append(f"| {r['category']} | {pt['official (squared) vs float64 squared']:.2e} | "
                     f"{pt['ours vs float64']:.2e} | {pt['nn_same']:.5f} | "
                     f"{pt['official_vs_predict']:.1e} |")

    lines += ["", "## 4. Maps on the same official patch-score grids (224 x 224)", "",
              f"{runs[0]['border_note']}", "",
              "| data | vs official `RescaleSegmentor` (scipy mode 'reflect') | max abs diff / "
              f"max map value | same, pixels >= {runs[0]['margin']} px from the edge |",
              "|---|---|---:|---:|"]
    for r in runs:
        for label, (all_px, inner) in r["maps"].items():
            lines.append(f"| {r['category']} | {label} | {all_px:.3e} | {inner:.3e} |")

    lines += ["", "## 5. End to end (each system's own embedding, coreset, scoring)", "",
              "| data | image AUROC official | official, BN untouched | ours (num_neighbors=1) "
              "| bank size ours / official | maps max abs diff, min-max normalised, ours vs "
              "official |", "|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        e = r["e2e"]
        a = e["auroc"]
        lines.append(f"| {r['category']} | {a['official']:.4f} | {a['official, BN untouched']:.4f} "
                     f"| {a['ours (num_neighbors=1)']:.4f} | {e['bank'][0]} / {e['bank'][1]} | "
                     f"{e['maps']:.3e} |")
    lines += ["", "| data | image scores compared | Spearman | max abs diff (min-max normalised) |",
              "|---|---|---:|---:|"]
    for r in runs:
        for label, (rho, diff) in r["e2e"]["agree"].items():
            lines.append(f"| {r['category']} | {label} | {rho:.6f} | {diff:.3e} |")
    return "\n".join(lines) + "\n" + NOTES


NOTES = """
## What the official code computes (read from its source)

- `PatchCore.load()` builds `NetworkFeatureAggregator`, whose `feature_dimensions()` runs
  `torch.ones([1, 3, 224, 224])` through the backbone as `patchcore.backbones.load()`
  returned it (a fresh torchvision model, in train mode; nothing calls `.eval()` first), up
  to the hook on the last extracted layer, which raises to stop the pass. BatchNorm layers
  up to layer3 therefore fold that constant image into their running statistics (momentum
  0.1); layer4 is never reached. `_embed`, `_fill_memory_bank` and `_predict` put the
  modules in eval mode, so this is the only train-mode pass (section 0 logs every call).
  The size of its effect here is that of seeded random weights, whose running statistics
  are still the initial (0, 1), so the update moves them a lot relative to their value
  (10% of a constant image's batch statistics); with ImageNet statistics the same update
  is a 10% blend towards those of a constant image instead. The mechanism is the same.
- `_embed`: `Unfold(3, padding=1)` neighbourhoods per layer, deeper layers resized
  bilinearly (align_corners=False) to layer2's grid, each flattened (C, 3, 3)
  neighbourhood average-pooled to 1024 (`MeanMapper`), the two layers' vectors stacked and
  pooled to 1024 (`Aggregator`). Ours computes the same numbers with the pooling before
  the resizing (both are linear).
- `ApproximateGreedyCoresetSampler`: features projected by a `torch.nn.Linear(D, 128,
  bias=False)` with its default (Kaiming-uniform) initialisation from the global torch
  RNG; the initial value of every point is its mean distance to 10 points drawn by
  `np.random.choice`; each step takes the argmax and lowers every point's value to its
  distance to the new centre; distances `sqrt(clamp(|a|^2 - 2 a.b + |b|^2, 0))`. It keeps
  `int(N * 0.1)` points. Ours: the same rule (`n_starts=10`), by default with its own
  seeded Gaussian projection and starting points, which section 2 replaces by the
  official ones. With `first=` ours starts from one point whose distances alone are the
  initial values, without the mean-distance term, hence a different selection.
- `NearestNeighbourScorer` + `FaissNN`: `faiss.IndexFlatL2`, whose `search` returns
  SQUARED L2 distances; no square root is taken. Patch score = mean over the `num_nn`
  nearest squared distances (num_nn = 1: the squared distance to the nearest bank
  entry); image score = maximum patch score (`PatchMaker.score`); map =
  `RescaleSegmentor`: bilinear upsampling of the squared patch scores to 224 x 224, then
  `scipy.ndimage.gaussian_filter(sigma=4)` (default mode 'reflect', i.e. the edge pixel
  repeated, truncate 4 -> radius 16). Ours: Euclidean distances, maximum patch distance
  with `num_neighbors=1` (eq. 7 reweighting otherwise), bilinear upsampling, separable
  Gaussian blur of radius 16 whose default border is torch's 'reflect' (= scipy 'mirror',
  the edge pixel not repeated). Squaring is monotone, so image rankings agree while
  min-max normalised scores and blurred maps differ by the square; the border mode
  changes only pixels within the kernel radius of the edge.
"""


def main() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")  # the official sampler's progress bars
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", type=Path, required=True,
                    help="checkout of amazon-science/patchcore-inspection")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--categories", nargs="+", default=["stripes", "rotated_part"],
                    help="synthetic categories (default: a texture and an object)")
    ap.add_argument("--n-train", type=int, default=16, help="training images per category")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from anomaly_bench.data import ensure_synthetic

    pc = import_official(args.official.resolve())
    root = ensure_synthetic(Path(args.data_root) / "synthetic")
    t0 = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = make_weights(Path(tmp) / f"wrn50_seed{args.seed}.pth", args.seed)
        for category in args.categories:
            print(f"  {category} ...", file=sys.stderr, flush=True)
            runs.append(run_category(pc, weights, root, category, args.n_train, args.seed))
    text = report(runs, args.official, args, time.perf_counter() - t0)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
