"""anomaly-bench APRIL-GAN side by side with the official VAND-APRIL-GAN code.

The official code is ByChelsea/VAND-APRIL-GAN (Chen et al., VAND 2023), run from a
checkout given by ``--official PATH`` in a child process (its own patched ``open_clip``
package shadows the installed one there; nothing of it is copied here): its ``train.py``
``train(args)`` and ``test.py`` ``test(args)`` run as its shell scripts call them, on
data in its layout with the ``meta.json`` its ``data/mvtec.py`` writes.

Inputs, the same for both systems:

- CLIP: ``--model`` (default ViT-L-14-336) at ``--image-size`` (518) with seeded random
  weights, built by anomaly-bench's open_clip, saved once and loaded by the official
  factory (``pretrained=<file>``) and by ours (``backbone.weights=<file>``); both build
  the towers with GELU, as the official code builds ViT-L-14-336 at 518 px
  (``backbone.quick_gelu=false``).
- Data: synthetic categories in MVTec layout. The adapters are trained on the annotated
  test images of ``--train-category`` (default grain) and tested on a texture and an
  object (stripes, rotated_part): ``--n-good`` normal and one image of each of
  ``--n-defect-types`` defect types per category; ``--n-refs`` training images per
  category are the pool of the few-shot references.
- Adapters: the official training (1 epoch, batch 2, Adam lr 1e-3, betas (0.5, 0.999),
  no stitching) writes ``epoch_1.pth``; ``anomaly-bench-import-aprilgan`` converts it and
  our method is restored from the converted ``model.pt``. Few-shot references: the ones
  the official code drew (its ``k_shot.txt``).

Printed (markdown):

1. Loss: the official loss of its first training batch (focal + dice per layer, captured
   from its ``FocalLoss`` and ``BinaryDiceLoss``) and ours (``training_step``) on the same
   two images in the same order from the official initial adapters (captured when its
   Adam optimiser is built).
2. Agreement: largest absolute difference of the maps (range 0-4 zero-shot) and of the
   image scores, per category, zero-shot and few-shot (``--k-shot``).
3. Cost: training images/s (the epoch loop, loading included, both sides); test ms/img
   (loading excluded), split into the CLIP forward (the official ``encode_image`` calls;
   our ``features_and_embedding``) and the rest.

Run-time patches of the official code (the child applies them and lists them):

- ``torch.Tensor.to('cuda')`` goes to the CPU when CUDA is unavailable: its
  ``VisionTransformer.forward`` sums attention maps that nothing uses into a tensor sent
  to a hard-coded ``cuda``.
- ``Tensor.__itruediv__`` is out of place for tensors that need gradients: ``train.py``
  normalises the adapted tokens in place, which breaks backward in float32 (it runs only
  under CUDA fp16 autocast, where the normalisation reads a cast copy).
- ``PIL.Image.fromarray(float array, mode='L')`` (its all-zero mask of a normal image)
  gets the array as uint8: Pillow >= 11 refuses the float array in mode L.
- Stub ``skimage`` and ``tabulate`` modules (imported by ``test.py`` for its PRO and its
  log table, not installed here); ``test.cal_pro_score`` is replaced by a recorder of the
  maps it is given (per category, in test order), ``test.roc_auc_score`` records the
  image scores it is given and computes as before.
- ``MVTecSolver.CLSNAMES`` lists the synthetic categories, so ``data/mvtec.py`` writes
  their ``meta.json``.
- Recorders (no change of behaviour): ``MVTecDataset.__getitem__`` (order and loading
  time), ``CLIP.encode_image`` (forward time), ``FocalLoss``/``BinaryDiceLoss`` outputs,
  the parameters given to ``torch.optim.Adam``.

Run::

    python benchmarks/vs_aprilgan_official.py --official /path/to/VAND-APRIL-GAN \\
        [--model ViT-L-14-336 --image-size 518 --blocks 6 12 18 24] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from vs_anomalib import machine_line

CPU = torch.device("cpu")
KINDS = {"stripes": "texture", "grain": "texture", "rotated_part": "object"}


# ---------------------------------------------------------------------- data in both layouts
def make_subset(src: Path, dst: Path, categories: list[str], n_good: int, n_defect_types: int,
                n_train: int) -> None:
    """Copy of ``n_good`` normal and one image of each of ``n_defect_types`` defect types
    (with its mask) per category, and ``n_train`` training images, MVTec layout."""
    for cat in categories:
        picks = sorted((src / cat / "test" / "good").iterdir())[:n_good]
        defects = sorted(d.name for d in (src / cat / "test").iterdir() if d.name != "good")
        picks += [sorted((src / cat / "test" / d).iterdir())[0] for d in defects[:n_defect_types]]
        picks += sorted((src / cat / "train" / "good").iterdir())[:n_train]
        for p in picks:
            rel = p.relative_to(src)
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dst / rel)
            if rel.parts[1] == "test" and rel.parts[2] != "good":
                mask = src / cat / "ground_truth" / rel.parts[2] / f"{p.stem}_mask.png"
                (dst / mask.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(mask, dst / mask.relative_to(src))


# ---------------------------------------------------------------------- the official side
def run_official(args: argparse.Namespace) -> None:
    """Child process: the official training and tests, recorded into work/official.pt."""
    work, official = Path(args.work), Path(args.official).resolve()
    sys.path.insert(0, str(official))
    patches = patch_official()
    import dataset
    import loss
    import open_clip
    import test
    import train
    from data.mvtec import MVTecSolver

    assert Path(open_clip.__file__).resolve().is_relative_to(official), open_clip.__file__
    rec: dict = {"getitem": [], "load_s": 0.0, "forward_s": 0.0, "losses": [], "adam": None,
                 "step_end": 0.0, "maps": [], "scores": [], "loop_start": None,
                 "loop_end": None}

    get = dataset.MVTecDataset.__getitem__

    def getitem(self, index):  # the loop over the test split (also what train.py reads)
        t0 = time.perf_counter()
        tested = "/test/" in self.data_all[index]["img_path"]
        if rec["loop_start"] is None and tested:
            rec["loop_start"] = t0
        item = get(self, index)
        if tested:
            rec["load_s"] += time.perf_counter() - t0
            rec["getitem"].append(item["img_path"])
        return item

    dataset.MVTecDataset.__getitem__ = getitem
    encode = open_clip.model.CLIP.encode_image

    def encode_image(self, *a, **k):
        t0 = time.perf_counter()
        out = encode(self, *a, **k)
        if rec["loop_start"] is not None and rec["loop_end"] is None:
            rec["forward_s"] += time.perf_counter() - t0
        return out

    open_clip.model.CLIP.encode_image = encode_image
    for cls in (loss.FocalLoss, loss.BinaryDiceLoss):
        def forward(self, *a, _orig=cls.forward, **k):
            out = _orig(self, *a, **k)
            rec["losses"].append(float(out.detach()))
            return out
        cls.forward = forward
    adam_init = torch.optim.Adam.__init__

    def adam(self, params, *a, **k):
        params = list(params)
        rec["adam"] = [p.detach().clone() for p in params]
        adam_init(self, params, *a, **k)
        step = self.step

        def timed_step(*sa, **sk):
            out = step(*sa, **sk)
            rec["step_end"] = time.perf_counter()
            return out
        self.step = timed_step

    torch.optim.Adam.__init__ = adam

    def pro(masks, amaps):
        if rec["loop_end"] is None:
            rec["loop_end"] = time.perf_counter()
        rec["maps"].append(torch.from_numpy(np.asarray(amaps, dtype=np.float32)).clone())
        return 0.0

    auroc = test.roc_auc_score

    def roc(y, s, *a, **k):
        if len(y) < 10_000:  # the image-level call (the pixel-level one is per pixel)
            rec["scores"].append(torch.as_tensor(np.asarray(s, dtype=np.float64)))
        return auroc(y, s, *a, **k)

    test.cal_pro_score, test.roc_auc_score = pro, roc

    MVTecSolver.CLSNAMES = [args.train_category]
    MVTecSolver(root=str(work / "train_data")).run()
    MVTecSolver.CLSNAMES = list(args.categories)
    MVTecSolver(root=str(work / "test_data")).run()
    config = str(official / "open_clip" / "model_configs" / f"{args.model}.json")
    common = {"config_path": config, "dataset": "mvtec", "model": args.model,
              "pretrained": str(work / "clip.pt"), "features_list": list(args.blocks),
              "image_size": args.image_size}
    out: dict = {"patches": patches}

    def reset() -> None:
        rec.update(getitem=[], load_s=0.0, forward_s=0.0, losses=[], maps=[], scores=[],
                   loop_start=None, loop_end=None)

    for sub in ("official_train", "official_zero_shot", "official_few_shot"):
        shutil.rmtree(work / sub, ignore_errors=True)  # k_shot.txt is appended to
    # training: one epoch over the training images, batch 2, no stitching
    reset()
    targs = argparse.Namespace(train_data_path=str(work / "train_data"),
                               save_path=str(work / "official_train"), epoch=1,
                               learning_rate=1e-3, batch_size=2, aug_rate=-1.0, print_freq=1,
                               save_freq=1, **common)
    train.setup_seed(111)
    train.train(targs)
    n_train = len(rec["getitem"])
    out["train"] = {"images": n_train, "order": list(rec["getitem"]),
                    "loop_s": rec["step_end"] - rec["loop_start"],
                    "first_loss": sum(rec["losses"][:2 * len(args.blocks)]),
                    "initial": rec["adam"], "load": os.getloadavg()[0]}
    for mode in ("zero_shot", "few_shot"):
        reset()
        targs = argparse.Namespace(
            data_path=str(work / "test_data"), save_path=str(work / f"official_{mode}"),
            checkpoint_path=str(work / "official_train" / "epoch_1.pth"), mode=mode,
            few_shot_features=list(args.blocks), k_shot=args.k_shot, seed=args.seed, **common)
        test.setup_seed(args.seed)
        test.test(targs)
        refs = Path(targs.save_path) / "k_shot.txt"
        out[mode] = {"order": list(rec["getitem"]), "maps": rec["maps"], "scores": rec["scores"],
                     "compute_s": rec["loop_end"] - rec["loop_start"] - rec["load_s"],
                     "forward_s": rec["forward_s"], "load": os.getloadavg()[0],
                     "refs": refs.read_text().split() if refs.is_file() else []}
    torch.save(out, work / "official.pt")


def patch_official() -> list[str]:
    """The run-time patches the official code needs on this machine (see the docstring)."""
    import importlib.machinery
    import importlib.util
    import types

    from PIL import Image

    done = []
    to = torch.Tensor.to

    def to_cpu(self, *a, **k):
        if not torch.cuda.is_available() and a and isinstance(a[0], str | torch.device) \
                and str(a[0]).startswith("cuda"):
            a = ("cpu", *a[1:])
        return to(self, *a, **k)

    torch.Tensor.to = to_cpu
    done.append("Tensor.to('cuda') -> CPU without CUDA (VisionTransformer.forward's unused "
                "attention sum)")
    idiv = torch.Tensor.__itruediv__

    def itruediv(self, other):
        return self.div(other) if self.requires_grad else idiv(self, other)

    torch.Tensor.__itruediv__ = itruediv
    done.append("Tensor /= out of place when it needs gradients (train.py's in-place "
                "normalisation breaks backward in float32)")
    fromarray = Image.fromarray

    def from_array(obj, mode=None, *a, **k):
        if mode == "L" and np.asarray(obj).dtype.kind == "f":
            obj = np.asarray(obj).astype(np.uint8)
        return fromarray(obj, mode, *a, **k) if mode else fromarray(obj, *a, **k)

    Image.fromarray = from_array
    done.append("Image.fromarray(float zeros, mode='L') as uint8 (a normal image's mask; "
                "Pillow >= 11 refuses float data in mode L)")
    if stub_pkg_resources():
        done.append("stub module pkg_resources whose packaging is the packaging package "
                    "(prompt_ensemble.py imports it; setuptools >= 81 no longer ships it)")
    for name in ("skimage", "tabulate"):
        if name not in sys.modules:
            try:
                __import__(name)
            except ImportError:
                stub = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, None))
                stub.measure = types.SimpleNamespace()
                stub.tabulate = lambda *a, **k: ""
                sys.modules[name] = stub
                done.append(f"stub module {name} (not installed; used only by test.py's "
                            "metrics, which the benchmark replaces)")
    done.append("test.cal_pro_score and test.roc_auc_score record the maps and image scores")
    done.append("MVTecSolver.CLSNAMES = the synthetic categories (meta.json)")
    return done


def stub_pkg_resources() -> bool:
    """Provide ``pkg_resources.packaging`` (imported by the official prompt_ensemble.py)
    when setuptools no longer ships ``pkg_resources``; True when the stub was needed."""
    import importlib.machinery
    import importlib.util

    try:
        import pkg_resources  # noqa: F401
        return False
    except ImportError:
        import packaging.version

        stub = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("pkg_resources",
                                                                             None))
        stub.packaging = packaging
        sys.modules["pkg_resources"] = stub
        return True


# ---------------------------------------------------------------------- our side
class Ours:
    """Our method on the same weights, data and adapters."""

    def __init__(self, args: argparse.Namespace) -> None:
        from anomaly_bench.backbones.clip import create_clip_model

        self.args, self.work = args, Path(args.work)
        self.blocks = [b - 1 for b in args.blocks]  # 1-based in the official code
        self.overrides = [f"backbone.name={args.model}", f"backbone.image_size={args.image_size}",
                          f"backbone.weights={self.work / 'clip.pt'}",
                          f"layers.blocks=[{','.join(map(str, self.blocks))}]",
                          f"resolution.size={args.image_size}"]
        if not (self.work / "clip.pt").is_file():
            model, _ = create_clip_model(args.model, None, False, None, args.seed,
                                         args.image_size)
            torch.save(model.state_dict(), self.work / "clip.pt")

    def build(self, k_shot: int = 0):
        """Our method with the converted official adapters (restored from a model.pt)."""
        from anomaly_bench import checkpoint
        from anomaly_bench.import_aprilgan import compose, convert

        path = convert(self.work / "official_train" / "epoch_1.pth",
                       self.work / "ours" / "model.pt", "mvtec", self.overrides)
        cfg = compose(["experiment=aprilgan_zero_shot_visa", *self.overrides,
                       f"method.k_shot={k_shot}"])
        payload = checkpoint.load(path)
        method = checkpoint.restore(payload, path, cfg["backbone"], cfg["method"])
        method.k_shot = k_shot
        return method.eval(), cfg

    def preprocess(self, method):
        from anomaly_bench.data import Preprocess

        mean, std = method.normalisation
        return Preprocess(size=self.args.image_size, crop=None, mean=mean, std=std,
                          resample="bicubic", mask_resample="bilinear")

    def records(self, root: Path, paths: list[str]):
        from anomaly_bench.types import SampleRecord

        out = []
        for p in paths:
            rel = Path(p).relative_to(root) if Path(p).is_absolute() else Path(p)
            cat, _, defect = rel.parts[:3]
            mask = (root / cat / "ground_truth" / defect / f"{rel.stem}_mask.png"
                    if defect != "good" and rel.parts[1] == "test" else None)
            out.append(SampleRecord(root / rel, int(mask is not None), defect, mask,
                                    category=cat))
        return out

    def batches(self, pre, with_masks: bool, size: int):
        from anomaly_bench.data import make_loader

        def make(records, what):
            yield from make_loader(records, pre, size, 0, with_masks=with_masks)
        return make

    def context(self, category: str, refs=None):
        from anomaly_bench.methods import MethodContext

        return MethodContext(dataset="synthetic", category=category, class_name=category,
                             references=refs, device=CPU, seed=self.args.seed,
                             out_dir=self.work / "ours", resume=False,
                             class_names={category: category})

    def loss(self, official: dict) -> float:
        """training_step on the official first batch from the official initial adapters."""
        method, _ = self.build()
        with torch.no_grad():
            params = list(method.adapters.parameters())
            for p, q in zip(params, official["initial"], strict=True):
                p.copy_(q)
        method.setup(self.context(self.args.train_category))
        records = self.records(self.work / "train_data", official["order"][:2])
        batch = next(self.batches(self.preprocess(method), True, 2)(records, "loss"))
        return float(method.training_step(batch).detach())

    def train_speed(self, official: dict) -> float:
        """Training images/s of our loop (one epoch, batch 2) over the official images."""
        from anomaly_bench.data.source import TrainSource
        from anomaly_bench.training import TrainSettings

        method, cfg = self.build()
        method.settings = TrainSettings.from_config({**cfg["method"]["train"], "epochs": 1})
        method.stitch_rate = 0.0  # as the official run (aug_rate -1)
        method.setup(self.context(self.args.train_category))
        records = self.records(self.work / "train_data", official["order"])
        source = TrainSource(records, self.batches(self.preprocess(method), True, 2), seed=0)
        t0 = time.perf_counter()
        method.fit(source)
        self.train_load = os.getloadavg()[0]
        return len(records) / (time.perf_counter() - t0)

    def test(self, official: dict, k_shot: int) -> dict:
        """Maps, image scores and times per category, in the official order."""
        from anomaly_bench.data.source import TrainSource
        from anomaly_bench.types import Prediction

        method, _ = self.build(k_shot)
        pre = self.preprocess(method)
        root = self.work / "test_data"
        forward = {"s": 0.0}
        joint = method.extractor.features_and_embedding

        def timed(images):
            t0 = time.perf_counter()
            out = joint(images)
            forward["s"] += time.perf_counter() - t0
            return out

        method.extractor.features_and_embedding = timed
        out: dict = {"maps": [], "scores": [], "compute_s": 0.0}
        records = self.records(root, official["order"])
        refs = self.records(root, official["refs"]) if k_shot else []
        for c, cat in enumerate(self.args.categories):
            refs_source = (TrainSource(refs[c * k_shot:(c + 1) * k_shot],
                                       self.batches(pre, False, 1), seed=0)
                           if k_shot else None)
            method.setup(self.context(cat, refs_source))
            preds = []
            for batch in self.batches(pre, False, 1)([r for r in records if r.category == cat],
                                                     "test"):
                t0 = time.perf_counter()
                preds.append(method.predict(batch))
                out["compute_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            final = method.finish(Prediction(
                torch.cat([p.image_scores for p in preds]),
                torch.cat([p.anomaly_maps for p in preds]),
                {k: torch.cat([p.extras[k] for p in preds]) for k in preds[0].extras}))
            out["compute_s"] += time.perf_counter() - t0
            out["maps"].append(final.anomaly_maps)
            out["scores"].append(final.image_scores.double())
        out["forward_s"], out["load"] = forward["s"], os.getloadavg()[0]
        return out


# ---------------------------------------------------------------------- report
def report(args, official: dict, ours: dict, n_test: int) -> str:
    tested = ", ".join(f"synthetic/{c} ({KINDS.get(c, '?')})" for c in args.categories)
    lines = [
        "# anomaly-bench APRIL-GAN vs the official VAND-APRIL-GAN code", "",
        f"{machine_line()}; official code "
        f"{args.revision}; {args.model} at {args.image_size} px, seeded random weights "
        f"(GELU, as the official code builds it), blocks {' '.join(map(str, args.blocks))} "
        f"(1-based); adapters trained by the official train.py on synthetic/"
        f"{args.train_category} ({official['train']['images']} annotated images, 1 epoch, "
        f"batch 2); tested on {tested}, "
        f"{n_test} images each; few-shot with the official code's k={args.k_shot} "
        "references.", "",
        "| what | official | ours | abs difference |", "|---|---:|---:|---:|",
        f"| loss of the first training batch (2 images, initial adapters) | "
        f"{official['train']['first_loss']:.6f} | {ours['loss']:.6f} | "
        f"{abs(official['train']['first_loss'] - ours['loss']):.1e} |", "",
        "| data | setting | max abs diff of maps | map range | max abs diff of image scores |",
        "|---|---|---:|---:|---:|",
    ]
    for mode in ("zero_shot", "few_shot"):
        for c, cat in enumerate(args.categories):
            a, b = official[mode]["maps"][c], ours[mode]["maps"][c]
            sa, sb = official[mode]["scores"][c], ours[mode]["scores"][c]
            setting = "zero-shot" if mode == "zero_shot" else f"few-shot k={args.k_shot}"
            lines.append(f"| synthetic/{cat} | {setting} | {float((a - b).abs().max()):.1e} | "
                         f"{float(a.min()):.3f}-{float(a.max()):.3f} | "
                         f"{float((sa - sb).abs().max()):.1e} |")
    n = n_test * len(args.categories)
    lines += ["", "| cost | official | ours | ours/official |", "|---|---:|---:|---:|"]
    ti, to = official["train"]["images"] / official["train"]["loop_s"], ours["train_speed"]
    lines.append(f"| training images/s | {ti:.3f} | {to:.3f} | {to / ti:.2f} |")
    for mode in ("zero_shot", "few_shot"):
        o, u = official[mode], ours[mode]
        name = "zero-shot" if mode == "zero_shot" else f"few-shot k={args.k_shot}"
        for what, vo, vu in (("test ms/img", o["compute_s"], u["compute_s"]),
                             ("  CLIP forward ms/img", o["forward_s"], u["forward_s"]),
                             ("  rest ms/img", o["compute_s"] - o["forward_s"],
                              u["compute_s"] - u["forward_s"])):
            lines.append(f"| {name} {what} | {1000 * vo / n:.0f} | {1000 * vu / n:.0f} | "
                         f"{vu / vo:.2f} |")
        lines.append(f"| {name}: rest / forward | "
                     f"{(o['compute_s'] - o['forward_s']) / o['forward_s']:.3f} | "
                     f"{(u['compute_s'] - u['forward_s']) / u['forward_s']:.3f} | |")
    phases = [("training", official["train"]["load"], ours["train_load"])] + [
        (m.replace("_", "-"), official[m]["load"], ours[m]["load"])
        for m in ("zero_shot", "few_shot")]
    lines += ["", "Machine shared with other jobs: 1-minute load average at the end of each "
              "phase (official / ours): " + "; ".join(f"{n} {a:.1f} / {b:.1f}"
                                                      for n, a, b in phases) + "."]
    lines += ["", "Run-time patches of the official code:", ""]
    lines += [f"- {p}" for p in official["patches"]]
    return "\n".join(lines) + "\n"


def meta_agreement(work: Path) -> str:
    """The meta.json the official data/mvtec.py wrote against ``anomaly-bench-data meta``'s
    index of the same folders (entries compared per category and phase, as sets: the
    official writer lists defect folders in ``os.listdir`` order)."""
    from anomaly_bench.data import get_layout, meta

    lines = ["", "| meta.json of | entries | same entries as anomaly-bench-data meta |",
             "|---|---:|---|"]
    layout = get_layout("mvtec")
    for sub in ("train_data", "test_data"):
        root = work / sub
        theirs = json.loads((root / "meta.json").read_text())
        ours = meta.build("mvtec", [layout.read_split(root, c) for c in theirs["test"]])

        def entries(index, phase, cat):
            return sorted(json.dumps(e, sort_keys=True) for e in index[phase][cat])
        same = all(entries(theirs, p, c) == entries(ours, p, c)
                   for p in meta.PHASES for c in theirs["test"])
        n = sum(len(v) for p in meta.PHASES for v in theirs[p].values())
        lines.append(f"| {sub} ({', '.join(theirs['test'])}) | {n} | "
                     f"{'yes' if same else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True, type=Path,
                    help="a checkout of ByChelsea/VAND-APRIL-GAN")
    ap.add_argument("--data-root", default="data", type=Path)
    ap.add_argument("--train-category", default="grain")
    ap.add_argument("--categories", nargs="+", default=["stripes", "rotated_part"])
    ap.add_argument("--n-good", type=int, default=2)
    ap.add_argument("--n-defect-types", type=int, default=2)
    ap.add_argument("--n-refs", type=int, default=4)
    ap.add_argument("--k-shot", type=int, default=1)
    ap.add_argument("--model", default="ViT-L-14-336")
    ap.add_argument("--image-size", type=int, default=518)
    ap.add_argument("--blocks", type=int, nargs="+", default=[6, 12, 18, 24],
                    help="the official features_list (1-based)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--revision", default=None,
                    help="the official commit, when --official is not a git checkout")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: temp)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_official(args)
    if not (args.official / "train.py").is_file() or not (args.official / "open_clip").is_dir():
        sys.exit(f"--official {args.official}: not a checkout of VAND-APRIL-GAN (train.py, "
                 "open_clip/)")
    from anomaly_bench.data import ensure_synthetic

    args.work = Path(args.work or tempfile.mkdtemp(prefix="vs_aprilgan_"))
    args.work.mkdir(parents=True, exist_ok=True)
    root = ensure_synthetic(args.data_root / "synthetic")
    for sub in ("train_data", "test_data"):
        shutil.rmtree(args.work / sub, ignore_errors=True)
    make_subset(root, args.work / "train_data", [args.train_category], args.n_good,
                args.n_defect_types, 1)  # (the official meta.json wants a train folder)
    make_subset(root, args.work / "test_data", args.categories, args.n_good,
                args.n_defect_types, args.n_refs)
    ours = Ours(args)  # writes the shared CLIP weights
    cmd = [sys.executable, __file__, "--child", *sys.argv[1:], "--work", str(args.work)]
    print(f"official code: {' '.join(cmd)}", file=sys.stderr)
    subprocess.run(cmd, check=True)
    official = torch.load(args.work / "official.pt", weights_only=True)
    rev = subprocess.run(["git", "-C", str(args.official), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    args.revision = args.revision or rev.stdout.strip() or json.dumps(str(args.official))
    results = {"loss": ours.loss(official["train"]), "train_speed": ours.train_speed(
        official["train"])}
    results["train_load"] = ours.train_load
    for mode, k in (("zero_shot", 0), ("few_shot", args.k_shot)):
        results[mode] = ours.test(official[mode], k)
    text = report(args, official, results, args.n_good + args.n_defect_types)
    text += meta_agreement(args.work)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
