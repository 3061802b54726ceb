"""anomaly-bench's WinCLIP side by side with anomalib's, on the same weights and tensors.

Both systems get the same seeded random ViT-B-16-plus-240 weights (saved once to a file,
loaded into each), the same preprocessed test tensors (bicubic resize of the 8-bit image
to 240 px, CLIP mean/std: our preprocessing), the same class name and the same
reference image for k = 1 (the runner's seeded choice), and anomalib's own prompt lists
(read from the installed or given anomalib at run time and passed to our method as its
``prompts`` keys). anomalib's ``WinClipModel`` is driven directly (no Lightning).

anomalib is run three ways, each by a patch applied at run time (nothing of anomalib is
copied into this project):

* released: as it ships. Its window pass permutes the window tokens to (tokens, windows,
  C) for a sequence-first transformer, but open_clip's transformer is batch-first
  (``Transformer.batch_first``), so attention runs across the windows and every window
  embedding of an image comes out the same: its zero-shot maps are flat within an image.
* corrected: the same code with the transformer told, for the duration of
  ``_get_window_embeddings`` only, that its input is sequence-first
  (``clip.visual.transformer.batch_first = False``): open_clip's transformer then turns
  the (tokens, windows, C) input to batch-first for its blocks and back, which is the
  layout anomalib's permutes assume. Nothing else changes.
* references unnormalised (k = 1): the reference image fed resized but not normalised,
  as anomalib's Lightning wrapper does (it takes them from the training loader before its
  pre-processor runs); the test images stay normalised. Ours is fed the same tensor for
  the agreement row, and is also compared as it runs (the reference preprocessed as the
  test images) to show the difference of the two behaviours.

anomalib's model is built offline: ``open_clip.create_model_and_transforms`` is wrapped
while it is constructed so that it builds the architecture without weights, and the
seeded state dict is loaded into it.

Figures: Spearman correlation of image scores and the largest absolute difference of
the 240 x 240 maps, ours against each anomalib variant; how flat the zero-shot maps are
(mean over images of max - min); the mean 2x2 window association score of k = 1
(anomalib's own ``visual_association_score``); ms/img at one batch size, zero-shot and
k = 1, each the fastest of ``--rounds`` passes over ``--time-images`` images,
alternating the systems. Run on a texture and an object of the synthetic data by
default. Prints figures, no pass/fail.

    python benchmarks/vs_anomalib_winclip.py [--data-root data]
        [--categories stripes rotated_part] [--anomalib PATH] [--batch 8]
        [--test-images N] [--time-images 8] [--rounds 2] [--released-batch 0]
        [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from vs_anomalib import CATEGORIES, machine_line

NAME = "ViT-B-16-plus-240"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------- shared inputs
def make_weights(path: Path, seed: int = 0) -> Path:
    """Seeded random ViT-B-16-plus-240 weights (open_clip keys), as anomaly-bench builds
    them with backbone.pretrained=false."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(NAME, pretrained=None)
    torch.save(model.state_dict(), path)
    return path


def load_category(root: Path, category: str, batch: int, n_test: int | None = None):
    """Test batches (our preprocessing) and the k = 1 reference as the runner chooses it;
    with ``n_test``, that many test images evenly spaced over the sorted test list (normal
    and anomalous alike)."""
    from anomaly_bench.data import Preprocess, get_layout, make_loader
    from anomaly_bench.data.source import TrainSource

    split = get_layout("synthetic").split(root, category)
    pre = Preprocess(size=240, crop=None, mean=CLIP_MEAN, std=CLIP_STD, resample="bicubic",
                     mask_resample="nearest")

    def batches(records, what=""):
        return iter(list(make_loader(records, pre, batch, 0, with_masks=split.has_masks)))

    records = list(split.test)
    if n_test and n_test < len(records):
        records = [records[i * len(records) // n_test] for i in range(n_test)]
    test = list(batches(records))
    refs = TrainSource(split.train, batches, seed=0).choose(1)
    ref = torch.cat([b.images for b in refs])
    return test, ref


# ---------------------------------------------------------------------- systems
class Memo:
    """A model's image encoding, computed once per input tensor while ``on``: the
    settings scored on the same test tensors share it (timings run with it off)."""

    def __init__(self, fn) -> None:
        self.fn, self.on, self.saved = fn, True, {}

    def __call__(self, images: torch.Tensor):
        if not self.on:
            return self.fn(images)
        if id(images) not in self.saved:  # the tensor is kept, so its id stays its own
            self.saved[id(images)] = (images, self.fn(images))
        return self.saved[id(images)][1]


class Ours:
    """Our WinCLIP on the seeded weights with anomalib's prompt lists."""

    name = "ours"

    def __init__(self, weights: Path, prompts: dict, class_name: str) -> None:
        from anomaly_bench.methods import build_method
        from anomaly_bench.methods.base import method_defaults

        cfg = {**method_defaults("winclip"), "input_size": 240, "prompts": prompts}
        backbone = {"name": NAME, "kind": "clip", "hub_tag": None, "pretrained": False,
                    "weights": str(weights), "image_size": 240}
        self.model = build_method(cfg, backbone, {"blocks": [-1]}, seed=0).eval()
        self.memo = self.model.embed = Memo(self.model.embed)
        self.class_name = class_name

    def configure(self, refs: torch.Tensor | None) -> None:
        from anomaly_bench.methods import MethodContext
        from anomaly_bench.types import Batch

        batches = None if refs is None else [Batch(
            images=refs, labels=torch.zeros(len(refs), dtype=torch.long),
            paths=[""] * len(refs), defect_types=[""] * len(refs))]
        self.model.setup(MethodContext(
            dataset="synthetic", category=self.class_name, class_name=self.class_name,
            references=batches, device=torch.device("cpu"), seed=0, out_dir=Path("."),
            resume=False))

    def predict(self, batch):
        pred = self.model.predict(batch)
        return pred.image_scores, pred.anomaly_maps

    def window_association(self, test) -> float:
        vals = [self.model.association(self.model.embed(b.images)[2][0],
                                       self.model.memory_windows[0]) for b in test]
        return float(torch.cat([v.flatten() for v in vals]).mean())


@contextmanager
def offline_clip(state: dict):
    """anomalib builds its CLIP with the laion400m_e31 weights from the hub: build the
    architecture alone and load ``state`` instead, while the block runs."""
    import open_clip

    real = open_clip.create_model_and_transforms

    def build(name, pretrained=None, **kwargs):
        model, train_tf, test_tf = real(name, pretrained=None, **kwargs)
        model.load_state_dict(state)
        return model, train_tf, test_tf

    open_clip.create_model_and_transforms = build
    try:
        yield
    finally:
        open_clip.create_model_and_transforms = real


def correct_window_pass(model) -> None:
    """Tell open_clip's transformer, during anomalib's window pass only, that its input is
    sequence-first, as anomalib's permutes assume (see the module docstring)."""
    original = model._get_window_embeddings
    transformer = model.clip.visual.transformer

    def window_pass(feature_map, masks):
        transformer.batch_first = False
        try:
            return original(feature_map, masks)
        finally:
            transformer.batch_first = True

    model._get_window_embeddings = window_pass


class Theirs:
    """anomalib's WinClipModel on the seeded weights, released or corrected."""

    def __init__(self, state: dict, class_name: str, corrected: bool) -> None:
        from anomalib.models.image.winclip.torch_model import WinClipModel

        with offline_clip(state):
            self.model = WinClipModel().eval()
        if corrected:
            correct_window_pass(self.model)
        self.memo = self.model.encode_image = Memo(self.model.encode_image)
        self.class_name = class_name
        self.name = "anomalib corrected" if corrected else "anomalib released"

    def configure(self, refs: torch.Tensor | None) -> None:
        self.model.setup(self.class_name, refs)
        if refs is None:
            self.model.k_shot = 0  # back to zero-shot after a few-shot setting

    def predict(self, batch):
        out = self.model(batch.images)
        return out.pred_score, out.anomaly_map

    def window_association(self, test) -> float:
        """By anomalib's own ``visual_association_score``."""
        from anomalib.models.image.winclip.utils import visual_association_score

        vals = [visual_association_score(self.model.encode_image(b.images)[1][0],
                                         self.model.visual_embeddings[0]) for b in test]
        return float(torch.cat([v.flatten() for v in vals]).mean())


def unnormalised(images: torch.Tensor) -> torch.Tensor:
    """The resized 8-bit image in [0, 1]: what anomalib's Lightning wrapper hands its model
    as references (our preprocessing without the normalisation)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return images * std + mean


# ---------------------------------------------------------------------- measuring
def score_all(system, test) -> tuple[torch.Tensor, torch.Tensor]:
    scores, maps = [], []
    with torch.no_grad():
        for batch in test:
            s, m = system.predict(batch)
            scores.append(s.flatten())
            maps.append(m)
    return torch.cat(scores), torch.cat(maps)


def ms_per_image(system, batches) -> float:
    n = sum(len(b.images) for b in batches)
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            system.predict(batch)
    return 1000 * (time.perf_counter() - t0) / n


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.double().numpy(), b.double().numpy()).statistic)


def flatness(maps: torch.Tensor) -> float:
    """Mean over images of (max - min) of the map."""
    flat = maps.flatten(1)
    return float((flat.amax(1) - flat.amin(1)).mean())


def run_category(root: Path, category: str, weights: Path, args) -> dict:
    from anomalib.models.image.winclip import prompting

    prompts = {"normal_states": list(prompting.NORMAL_STATES),
               "anomalous_states": list(prompting.ANOMALOUS_STATES),
               "templates": list(prompting.TEMPLATES)}
    state = torch.load(weights, map_location="cpu", weights_only=True)
    class_name = category.replace("_", " ")
    test, ref = load_category(root, category, args.batch, args.test_images)
    systems = [Ours(weights, prompts, class_name), Theirs(state, class_name, True),
               Theirs(state, class_name, False)]
    settings = {"zero-shot": None, "k=1": ref,
                "k=1, reference unnormalised": unnormalised(ref)}
    out = {"n_test": sum(len(b.images) for b in test), "scores": {}, "timing": {},
           "assoc": {}}
    with torch.no_grad():
        for setting, refs in settings.items():
            for system in systems:  # ours too, on the same unnormalised reference
                print(f"  {category}: scoring {setting}, {system.name}", file=sys.stderr,
                      flush=True)
                system.configure(refs)
                out["scores"][(setting, system.name)] = score_all(system, test)
                if setting == "k=1":
                    out["assoc"][system.name] = system.window_association(test)
        # timings: the first --time-images test images, systems alternating, fastest pass
        timed = test[:max(1, -(-args.time_images // args.batch))]
        for system in systems:
            system.memo.on = False
            system.memo.saved.clear()
        for r in range(args.rounds):
            for setting in ("zero-shot", "k=1"):
                for system in (systems if r % 2 == 0 else systems[::-1]):
                    print(f"  {category}: timing {setting}, {system.name} (round {r + 1})",
                          file=sys.stderr, flush=True)
                    system.configure(settings[setting])
                    ms = ms_per_image(system, timed)
                    key = (setting, system.name)
                    out["timing"][key] = min(ms, out["timing"].get(key, float("inf")))
        if args.released_batch:  # anomalib at its own default batch: one pass
            big = load_category(root, category, args.released_batch, args.released_batch)[0][:1]
            print(f"  {category}: timing zero-shot, anomalib released at batch "
                  f"{args.released_batch}", file=sys.stderr, flush=True)
            systems[2].configure(None)
            out["timing"][("zero-shot", f"anomalib released, batch {args.released_batch}")] = \
                ms_per_image(systems[2], big)
    out["timed_images"] = sum(len(b.images) for b in timed)
    return out


def report(runs: list[tuple[str, str, dict]], args) -> str:
    import anomalib
    import open_clip

    lines = [
        "# WinCLIP: anomaly-bench vs anomalib",
        "",
        f"{machine_line()}; anomalib {anomalib.__version__}, open_clip "
        f"{open_clip.__version__}; {NAME} with the same seeded random weights in both; "
        f"the same preprocessed tensors (bicubic 240 px, CLIP mean/std), class name and "
        f"k = 1 reference; anomalib's prompt lists in both; batch {args.batch}.",
        "",
        "| data | setting | anomalib variant | Spearman of image scores | max abs map diff "
        "| map range: ours / anomalib |",
        "|---|---|---|---:|---:|---:|",
    ]
    for dataset, kind, res in runs:
        s = res["scores"]
        rows = [(setting, system, setting) for setting, system in s if system != "ours"]
        # the behaviours side by side: anomalib's unnormalised reference against ours
        # preprocessing the reference as the test images
        rows += [(setting, system, "k=1") for setting, system in s
                 if system != "ours" and setting.endswith("unnormalised")]
        for setting, system, ours_setting in rows:
            scores, maps = s[(setting, system)]
            o_scores, o_maps = s[(ours_setting, "ours")]
            label = setting if ours_setting == setting else \
                f"{setting} (ours: reference normalised)"
            lines.append(
                f"| {dataset} ({kind}) | {label} | {system} | "
                f"{spearman(o_scores, scores):.5f} | {(o_maps - maps).abs().max():.2e} | "
                f"{flatness(o_maps):.4f} / {flatness(maps):.4f} |")
    lines += ["", "| data | mean 2x2 window association, k = 1 | value |", "|---|---|---:|"]
    for dataset, kind, res in runs:
        for system, v in res["assoc"].items():
            lines.append(f"| {dataset} ({kind}) | {system} | {v:.2e} |")
    lines += ["", "| data | setting | system | ms/img | ours / this |", "|---|---|---|---:|---:|"]
    for dataset, kind, res in runs:
        t = res["timing"]
        for (setting, system), ms in t.items():
            ratio = t[(setting, "ours")] / ms
            lines.append(f"| {dataset} ({kind}) | {setting} | {system} | {ms:.0f} | "
                         f"{ratio:.2f} |")
    lines += ["", f"Timings: the first {runs[0][2]['timed_images']} test images, fastest of "
              f"{args.rounds} passes, the systems alternating"
              + (f" (the released anomalib at batch {args.released_batch}: one pass over one "
                 "batch)" if args.released_batch else "") + "; maps compared on "
              f"{runs[0][2]['n_test']} test images of each category."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--categories", nargs="+", default=["stripes", "rotated_part"],
                    help="synthetic categories (default: a texture and an object)")
    ap.add_argument("--anomalib", type=Path, default=None,
                    help="a checkout of anomalib (its src/ is imported) instead of the "
                         "installed package")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--test-images", type=int, default=None,
                    help="score N test images evenly spaced over the test set (default: all)")
    ap.add_argument("--time-images", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--released-batch", type=int, default=0,
                    help="also time released anomalib once at this batch size (0 = skip; "
                         "its datamodules' default eval batch is 32): its window pass "
                         "attends across the windows of the whole batch, at 32 an 11 GB "
                         "(2x2) and a 16 GB (3x3) attention matrix per layer")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.anomalib:
        sys.path.insert(0, str(args.anomalib / "src"))
    from anomaly_bench.data import ensure_synthetic

    root = ensure_synthetic(Path(args.data_root) / "synthetic")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = make_weights(Path(tmp) / "vit_b16_plus_240_seed0.pt")
        for category in args.categories:
            runs.append((f"synthetic/{category}", CATEGORIES.get(category, "?"),
                         run_category(root, category, weights, args)))
    text = report(runs, args)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
