"""anomaly-bench MMR side by side with the official MMR code (zhangzilongc/MMR).

The official code is used from a checkout given by ``--official PATH`` (put on
``sys.path``; nothing of it is copied here), driven through its own ``MMR_base``,
``MMR_pipeline_.fit`` (ten epochs of one batch each: ten optimiser steps under its
``mmr_adjust_learning_rate``) and ``MMR_pipeline_.evaluation``. On current NumPy, timm,
pandas and a CPU it needs these run-time patches, applied here and printed with the
results:

1. ``np.float`` (removed in NumPy 1.24; its sin-cos position embedding uses it) -> float.
2. ``timm.models.vision_transformer.Block`` no longer takes ``qk_scale`` (timm >= 0.9):
   the name is rebound to a wrapper that drops it (the block computes the same).
3. ``timm.optim.optim_factory.add_weight_decay`` is now ``param_groups_weight_decay``
   (same groups): aliased.
4. Packages its package imports but the compared code never calls (``fvcore``'s
   ``CfgNode`` for its config module, ``seaborn``, ``pandas``, ``skimage``: plots and its
   PRO, whose ``DataFrame.append`` pandas 2 removed) are stubbed.
5. The CUDA device hard-coded in ``tools/train.py``: the pipeline is built here with
   ``torch.device("cpu")``, and its teacher is a torchvision ``wide_resnet50_2`` built
   without the ImageNet download ``utils.backbones.load`` would start.
6. Its masks come from ``torch.rand`` inside ``MMR_.random_masking``: the model's
   ``forward`` is wrapped to pass the benchmark's ``ids_shuffle`` (its own argument), so
   both systems mask the same patches; ``each_patch_loss_function`` is wrapped to record
   each step's loss, and ``save_image`` (called by ``evaluation`` with
   ``TEST.save_segmentation_images``) records the maps instead of writing figures.

Both systems get the same seeded random ViT-B/16 encoder (MAE's architecture, sin-cos
positions), the same seeded random FPN and mask token (ours, copied into its model in
parameter order) and the same seeded random WideResNet50-2 teacher (timm's, loaded into
torchvision's), the same batch (training images through our test preprocessing) and the
same masks. Printed per synthetic category (a texture and an object by default):

- per step: its loss and ours (|difference| <= 1e-5 asked);
- after the ten steps: maps and image scores of the test images (|difference| <= 1e-4);
- training images/s: ours (anomaly_bench.training.train) and its ``fit``, two steps each,
  the systems alternating for two rounds (the fastest counts);
- test ms/image: ours split into teacher, encoder (ViT), pyramid and the rest (distances,
  upsampling, blur, maximum), and its ``evaluation`` (fastest of two, alternating);
- ours with CPU bfloat16 autocast (``method.amp``) and without channels-last: the largest
  map difference and the time, on the tiny model (ViT-Ti/16 + ResNet-18 teacher).

Its ground-truth masks are not compared: it resizes them bilinearly and counts only the
pixels equal to the maximum as defect (masks shrink); anomaly-bench binarises masks as for
every method (nearest resize, non-zero = defect).

    python benchmarks/vs_mmr_official.py --official /work/refs/mmr \\
        [--categories stripes rotated_part] [--data-root data]
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from vs_anomalib import CATEGORIES, machine_line

STEPS = 10
WARMUP = 5
ROUNDS = 2
BATCH = 4
CPU = torch.device("cpu")
PATCHES = [
    "np.float -> float (NumPy >= 1.24 removed it; used by get_1d_sincos_pos_embed)",
    "timm Block(qk_scale=...) -> Block without it (timm >= 0.9 dropped the argument)",
    "timm.optim.optim_factory.add_weight_decay -> timm.optim.param_groups_weight_decay",
    "stub modules fvcore (CfgNode), seaborn, pandas, skimage while its package is imported "
    "(not called here; its PRO needs pandas < 2)",
    "device cpu instead of tools/train.py's cuda:0; torchvision WRN50 built without download",
    "MMR_.forward given the benchmark's ids_shuffle; loss and save_image recorded",
]


# ---------------------------------------------------------------------- the official code
def load_official(path: Path):
    """Import the official MMR package from ``path`` with the run-time patches above."""
    import timm
    import timm.models.vision_transformer as vt
    import timm.optim
    import timm.optim.optim_factory as of

    np.float = float  # noqa: NPY001 - patch 1, the alias the official code reads
    block = vt.Block
    if not getattr(block, "_qk_scale_dropped", False):  # patch 2
        def Block(*args, qk_scale=None, **kwargs):
            return block(*args, **kwargs)
        Block._qk_scale_dropped = True
        vt.Block = Block
    of.add_weight_decay = timm.optim.param_groups_weight_decay  # patch 3

    class CfgNode(dict):  # patch 4
        def __getattr__(self, k):
            return self[k]

        def __setattr__(self, k, v):
            self[k] = v

        def clone(self):
            return CfgNode(self)

    stubs = {"fvcore": types.ModuleType("fvcore"),
             "fvcore.common": types.ModuleType("fvcore.common"),
             "fvcore.common.config": types.ModuleType("fvcore.common.config"),
             "seaborn": types.ModuleType("seaborn"), "pandas": types.ModuleType("pandas"),
             "skimage": types.ModuleType("skimage"),
             "skimage.measure": types.ModuleType("skimage.measure")}
    stubs["fvcore.common.config"].CfgNode = CfgNode
    stubs["skimage"].measure = stubs["skimage.measure"]
    added = [name for name in stubs if name not in sys.modules]
    sys.modules.update({name: stubs[name] for name in added})
    sys.path.insert(0, str(path))
    try:
        import models.MMR.MMR_pipeline as pipeline
        from models.MMR import MMR_base, MMR_pipeline_
    finally:  # only its modules hold the stubs; other libraries see the real environment
        for name in added:
            sys.modules.pop(name, None)
    return MMR_base, MMR_pipeline_, pipeline


def official_cfg(lr: float):
    ns = types.SimpleNamespace
    return ns(DATASET=ns(imagesize=224),
              TRAIN=ns(MMR=ns(layers_to_extract_from=["layer1", "layer2", "layer3"],
                              finetune_mask_ratio=0.4, test_mask_ratio=0.0)),
              TRAIN_SETUPS=ns(learning_rate=lr, epochs=STEPS, warmup_epochs=WARMUP,
                              weight_decay=0.05),
              TEST=ns(pixel_mode_verify=False, save_segmentation_images=True,
                      save_video_segmentation_images=False))


# ---------------------------------------------------------------------- ours
def build_ours(tiny: bool = False, overrides: tuple[str, ...] = ()):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fixtures import compose_config
    from omegaconf import OmegaConf

    from anomaly_bench.methods import build_method

    args = ["method=mmr", "backbone.pretrained=false", f"method.epochs={STEPS}",
            f"method.train.warmup_epochs={WARMUP}", *overrides]
    if tiny:
        args += ["backbone.name=vit_tiny_patch16_224", "method.teacher=resnet18"]
    cfg = compose_config(args)
    g = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("method", "backbone", "layers")}
    return build_method(g["method"], g["backbone"], g["layers"], 0)


def copy_into_official(ours, theirs) -> None:
    """Our encoder, mask token and pyramid into the official MMR_ (names, then order)."""
    enc = {k: v for k, v in ours.encoder.model.state_dict().items()}
    own = theirs.state_dict()
    with torch.no_grad():
        for k, v in enc.items():
            own[k].copy_(v)
        own["decoder_FPN_mask_token"].copy_(ours.mask_token)
        mine = [p for stage in ours.pyramid for p in stage.parameters()]
        official = [p for stage in theirs.stages for p in stage.parameters()]
        assert [p.shape for p in mine] == [p.shape for p in official]
        for a, b in zip(official, mine, strict=True):
            a.copy_(b)
    # fixed position embeddings: equal by construction, checked
    pos = ours._position(14, 14, 768, CPU)
    assert torch.allclose(theirs.decoder_FPN_pos_embed[0, 1:], pos, atol=1e-6)


def official_teacher(ours):
    import torchvision

    from anomaly_bench.backbones.extractor import create_timm_model

    timm_model, _ = create_timm_model("wide_resnet50_2", "tv_in1k", False, None, 0)
    tv = torchvision.models.wide_resnet50_2(weights=None)
    tv.load_state_dict(timm_model.state_dict(), strict=True)
    return tv.eval()


def load_category(root: Path, category: str):
    from anomaly_bench.backbones.base import IMAGENET_MEAN, IMAGENET_STD
    from anomaly_bench.data import Preprocess, get_layout, make_loader

    split = get_layout("mvtec").split(root, category)
    pre = Preprocess(size=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     resample="bilinear", mask_resample="nearest")
    train = next(iter(make_loader(split.train[:BATCH], pre, BATCH, 0, with_masks=False)))
    good = [r for r in split.test if r.label == 0][:4]
    bad = [r for r in split.test if r.label == 1][:4]
    tests = list(make_loader(good + bad, pre, BATCH, 0, with_masks=True))
    return train, tests


# ---------------------------------------------------------------------- one category
def compare(official, root: Path, category: str) -> dict:
    from anomaly_bench.training import train
    from anomaly_bench.types import Batch

    MMR_base, MMR_pipeline_, pipeline = official
    train_batch, tests = load_category(root, category)
    g = torch.Generator().manual_seed(7)
    shuffles = [torch.rand(BATCH, 196, generator=g).argsort(1) for _ in range(STEPS)]
    keeps = [s[:, :int(196 * 0.6)] for s in shuffles]

    ours = build_ours()
    cfg = official_cfg(1e-3)
    theirs = MMR_base(cfg=cfg, scale_factors=(4.0, 2.0, 1.0), FPN_output_dim=(256, 512, 1024))
    copy_into_official(ours, theirs)
    import timm.optim

    groups = timm.optim.param_groups_weight_decay(theirs, 0.05)
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    teacher = official_teacher(ours)
    runner = MMR_pipeline_(cur_model=teacher, mmr_model=theirs, optimizer=optimizer,
                           device=CPU, cfg=cfg)
    # patch 6: masks and recorded losses / maps
    forward = theirs.forward
    step = {"i": 0}

    def masked_forward(imgs, mask_ratio=0.75, ids_shuffle=None):
        if mask_ratio > 0:
            ids_shuffle = shuffles[step["i"] % STEPS]
            step["i"] += 1
        return forward(imgs, mask_ratio, ids_shuffle=ids_shuffle)

    theirs.forward = masked_forward
    their_losses, their_maps = [], []
    loss_fn = pipeline.each_patch_loss_function

    def recording_loss(a, b):
        loss = loss_fn(a, b)
        their_losses.append(float(loss.detach()))
        return loss

    pipeline.each_patch_loss_function = recording_loss
    pipeline.save_image = lambda cfg, segmentations, **kw: their_maps.append(segmentations)

    runner.fit([train_batch.images.clone()])
    step_losses = list(their_losses)  # the timing runs below record theirs too

    # ours: the shared loop, same batch, same masks
    class Source:
        def __len__(self):
            return BATCH

        def epoch(self, index):
            return [train_batch]

    it = iter(keeps)
    ours.keep_indices = lambda images: next(it)
    torch.manual_seed(0)
    our_losses = train(ours, Source(), ours.settings, CPU)

    # after the ten steps: maps and image scores
    loader = [{"image": b.images, "is_anomaly": b.labels, "mask": b.masks,
               "image_path": b.paths, "image_name": b.paths} for b in tests]
    runner.evaluation(loader)
    their_map = torch.from_numpy(np.asarray(their_maps[0], dtype=np.float32))
    ours.eval()
    our_maps = torch.cat([ours.predict(Batch(images=b.images, labels=b.labels, paths=b.paths,
                                             defect_types=b.defect_types)).anomaly_maps
                          for b in tests])
    n_test = sum(len(b.paths) for b in tests)
    # cost: the systems alternate (the 2 cores are shared), the fastest round counts
    from dataclasses import replace

    timing = replace(ours.settings, epochs=2, warmup_epochs=0)
    cfg.TRAIN_SETUPS.epochs, cfg.TRAIN_SETUPS.warmup_epochs = 2, 0
    ours.keep_indices = lambda images: keeps[0]
    their_train_s = our_train_s = their_test_s = float("inf")
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        runner.fit([train_batch.images.clone()])
        their_train_s = min(their_train_s, (time.perf_counter() - t0) / 2)
        t0 = time.perf_counter()
        train(ours, Source(), timing, CPU)
        our_train_s = min(our_train_s, (time.perf_counter() - t0) / 2)
        t0 = time.perf_counter()
        runner.evaluation(loader)
        their_test_s = min(their_test_s, time.perf_counter() - t0)
    ours.eval()
    split = time_split(ours, tests, ROUNDS)
    return {
        "category": category, "kind": CATEGORIES.get(category, "?"),
        "losses": list(zip(step_losses, our_losses, strict=True)),
        "map_diff": float((their_map - our_maps).abs().max()),
        "map_range": float(our_maps.max() - our_maps.min()),
        "score_diff": float((their_map.flatten(1).amax(1) - our_maps.flatten(1).amax(1))
                            .abs().max()),
        "their_img_s": BATCH / their_train_s, "our_img_s": BATCH / our_train_s,
        "their_ms": 1000 * their_test_s / n_test, "split": split,
    }


def time_split(method, tests, rounds: int = 3) -> dict:
    """ms/image of the teacher, the encoder (ViT), the pyramid and the rest, each the
    fastest of ``rounds`` passes over the test batches."""
    import torch.nn.functional as F

    from anomaly_bench.ops.blur import gaussian_blur

    best: dict[str, float] = {}
    n = sum(len(b.paths) for b in tests)
    with torch.no_grad():
        for _ in range(rounds):
            t = dict.fromkeys(("teacher", "encoder", "pyramid", "rest", "total"), 0.0)
            for b in tests:
                x = b.images
                s0 = time.perf_counter()
                feats = method.teacher_features(x)
                s1 = time.perf_counter()
                keep = torch.arange(196).expand(len(x), 196)
                tokens = method.encoder.forward_kept(x, keep[:, None])[:, 0, 1:]
                s2 = time.perf_counter()
                tokens = tokens + method._position(14, 14, tokens.shape[-1], CPU)
                grid = tokens.transpose(1, 2).reshape(len(x), -1, 14, 14)
                grid = grid.contiguous(memory_format=torch.channels_last)
                recon = [stage(grid) for stage in method.pyramid]
                s3 = time.perf_counter()
                maps = sum(F.interpolate(d[:, None], size=(224, 224), mode="bilinear",
                                         align_corners=True)
                           for d in method.distances(feats, recon))
                maps = gaussian_blur(maps, 4.0, "reflect")[:, 0]
                maps.flatten(1).amax(1)
                s4 = time.perf_counter()
                for k, v in zip(("teacher", "encoder", "pyramid", "rest"),
                                (s1 - s0, s2 - s1, s3 - s2, s4 - s3), strict=True):
                    t[k] += v
                t["total"] += s4 - s0
            best = {k: min(best.get(k, 1e9), 1000 * v / n) for k, v in t.items()}
    return best


def precision_effects(root: Path, category: str) -> dict:
    """Tiny model: maps with CPU bfloat16 autocast and without channels-last vs float32
    channels-last (the default), largest difference and ms/image."""
    from anomaly_bench.types import Batch

    _, tests = load_category(root, category)
    out = {}
    ref = None
    for name, over in (("float32, channels-last", ()), ("bfloat16 autocast", ("method.amp=true",)),
                       ("float32, contiguous", ("method.channels_last=false",))):
        m = build_ours(tiny=True, overrides=over).eval()
        t0 = time.perf_counter()
        for _ in range(3):
            maps = torch.cat([m.predict(Batch(images=b.images, labels=b.labels, paths=b.paths,
                                              defect_types=b.defect_types)).anomaly_maps
                              for b in tests])
        ms = 1000 * (time.perf_counter() - t0) / (3 * maps.shape[0])
        ref = maps if ref is None else ref
        out[name] = (float((maps - ref).abs().max()), float(ref.max() - ref.min()), ms)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True, type=Path,
                    help="checkout of github.com/zhangzilongc/MMR")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--categories", nargs="+", default=["stripes", "rotated_part"])
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    from anomaly_bench.data import ensure_synthetic

    root = ensure_synthetic(Path(args.data_root) / "synthetic")
    official = load_official(args.official.resolve())
    print("# anomaly-bench MMR vs the official MMR code\n")
    print(machine_line() + "\n")
    print("Run-time patches applied to the official code:")
    for i, p in enumerate(PATCHES, 1):
        print(f"{i}. {p}")
    for cat in args.categories:
        sys.stdout.flush()
        r = compare(official, root, cat)
        print(f"\n## synthetic/{r['category']} ({r['kind']}), ViT-B/16 + WRN50-2, "
              f"batch {BATCH}, {STEPS} steps\n")
        print("| step | official loss | ours | abs. difference |\n|---:|---:|---:|---:|")
        for i, (a, b) in enumerate(r["losses"]):
            print(f"| {i} | {a:.7f} | {b:.7f} | {abs(a - b):.1e} |")
        print(f"\nAfter the steps: maps max |diff| {r['map_diff']:.2e} (map range "
              f"{r['map_range']:.3f}), image scores max |diff| {r['score_diff']:.2e}.")
        s = r["split"]
        nets = s["teacher"] + s["encoder"] + s["pyramid"]
        print(f"\nTraining images/s: official {r['their_img_s']:.2f}, ours {r['our_img_s']:.2f} "
              f"(ratio {r['our_img_s'] / r['their_img_s']:.2f}).")
        print(f"Test ms/image: official {r['their_ms']:.0f}; ours {s['total']:.0f} = teacher "
              f"{s['teacher']:.0f} + encoder {s['encoder']:.0f} + pyramid {s['pyramid']:.0f} "
              f"+ rest {s['rest']:.1f} (rest = {100 * s['rest'] / nets:.1f}% of the networks).")
    print("\n## Tiny model (ViT-Ti/16 + ResNet-18), CPU: precision and layout\n")
    print("| setting | max map diff | map range | ms/image |\n|---|---:|---:|---:|")
    for name, (d, rng, ms) in precision_effects(root, args.categories[0]).items():
        print(f"| {name} | {d:.2e} | {rng:.3f} | {ms:.1f} |")


if __name__ == "__main__":
    main()
