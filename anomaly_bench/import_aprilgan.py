"""``anomaly-bench-import-aprilgan SRC DEST --trained-on mvtec|visa [overrides]``.

The official APRIL-GAN repository ships its trained adapters (``exps/pretrained/
mvtec_pretrained.pth``, trained on MVTec AD, and ``visa_pretrained.pth``, trained on
VisA). Its ``train.py`` saves ``{"trainable_linearlayer": LinearLayer.state_dict()}``:
``fc.<i>.weight`` (embed_dim x width) and ``fc.<i>.bias`` for the i-th entry of its
``features_list``, which is exactly ``adapters.<i>`` of ``method=aprilgan`` for the i-th
block of ``layers.blocks`` (both in increasing block order). This command reads such a
file as data (``torch.load(weights_only=True)``: tensors only, nothing is executed),
checks every name and shape against the configured CLIP model, and writes a ``model.pt``
that ``stage=test checkpoint=DEST`` accepts: its configuration is the preset that tests
those adapters (``aprilgan_zero_shot_visa`` for adapters trained on MVTec AD,
``aprilgan_zero_shot_mvtec`` for VisA's), with any Hydra overrides given after the
options (e.g. ``backbone.weights=ViT-L-14-336.pt``); its description names the dataset
and the categories the adapters learned from, so testing them on those is refused.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from anomaly_bench import checkpoint
from anomaly_bench.backbones.vit import blocks_tag
from anomaly_bench.backbones.weights import weights_tag
from anomaly_bench.configs import config_dir
from anomaly_bench.errors import AnomalyBenchError, CheckpointError, ConfigError
from anomaly_bench.methods import method_schema
from anomaly_bench.schema import validate

#: The categories of the official meta.json files (data/mvtec.py, data/visa.py there).
OFFICIAL_CATEGORIES = {
    "mvtec": ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
              "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood",
              "zipper"),
    "visa": ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
             "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum"),
}
#: The preset that tests adapters trained on a dataset (on the other one).
PRESETS = {"mvtec": "aprilgan_zero_shot_visa", "visa": "aprilgan_zero_shot_mvtec"}
KEY = "trainable_linearlayer"


def compose(overrides: Sequence[str]) -> dict[str, Any]:
    """The resolved run configuration ``anomaly-bench OVERRIDES`` would use, validated."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            cfg = hydra_compose("config", overrides=list(overrides))
    except Exception as exc:  # Hydra's own override and composition errors
        raise ConfigError(f"cannot compose the configuration {list(overrides)}: {exc}") \
            from None
    plain: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    validate(plain, method_schema(str(plain["method"]["name"])))
    return plain


def read_official(path: Path) -> dict[str, torch.Tensor]:
    """``{fc.<i>.weight|bias: tensor}`` of an official adapters file (CPU, float32)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file (expected the official APRIL-GAN "
                              "adapters, e.g. exps/pretrained/mvtec_pretrained.pth).") from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"{path} cannot be read as tensors ({first}); expected the official APRIL-GAN "
            f"adapters file, a dict {{'{KEY}': state dict}} saved by its train.py (objects "
            "other than tensors are never loaded).") from None
    state = obj.get(KEY) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        found = sorted(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path} is not an official APRIL-GAN adapters file: expected a dict with "
            f"'{KEY}' holding fc.<i>.weight and fc.<i>.bias tensors, found {found}.")
    return {k: v.float() for k, v in state.items()}


def convert(source: Path, dest: Path, trained_on: str, overrides: Sequence[str] = ()) -> Path:
    """Write ``dest`` (a model.pt) from the official adapters file ``source``."""
    if trained_on not in PRESETS:
        raise ConfigError(f"--trained-on {trained_on!r}: the official adapters were trained "
                          f"on {' or '.join(PRESETS)}.")
    state = read_official(Path(source))
    cfg = compose([f"experiment={PRESETS[trained_on]}", *overrides])
    if cfg["method"]["name"] != "aprilgan" or cfg["backbone"].get("kind") != "clip":
        raise ConfigError("the official adapters belong to method=aprilgan on a CLIP backbone.")
    import open_clip

    backbone, blocks = cfg["backbone"], list(cfg["layers"]["blocks"] or [])
    arch = open_clip.get_model_config(backbone["name"])
    if arch is None:
        raise ConfigError(f"backbone.name={backbone['name']} is not an open_clip model.")
    width, dim, n = (int(arch["vision_cfg"]["width"]), int(arch["embed_dim"]),
                     int(arch["vision_cfg"]["layers"]))
    if any(isinstance(b, bool) or not isinstance(b, int) or not -n <= b < n for b in blocks):
        raise ConfigError(f"layers.blocks={blocks}: {backbone['name']} has {n} blocks.")
    selection = sorted({b % n for b in blocks})
    expected = {f"fc.{i}.{p}": (dim, width) if p == "weight" else (dim,)
                for i in range(len(selection)) for p in ("weight", "bias")}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if shapes != expected:
        raise CheckpointError(
            f"{source} holds {len(state) // 2} adapters with shapes {_summary(shapes)}, but "
            f"{backbone['name']} with layers.blocks={blocks} needs {len(selection)} of "
            f"Linear({width}, {dim}) ({_summary(expected)}): pass the backbone and "
            "layers.blocks the adapters were trained with.")
    from anomaly_bench.runner import resolution_tag

    seed = int(cfg["seed"])
    tag = weights_tag(backbone["name"], backbone.get("hub_tag"), bool(backbone["pretrained"]),
                      backbone.get("weights"), seed, backbone.get("weights_url"), "clip",
                      bool(backbone.get("quick_gelu", False)))
    meta = {"method": "aprilgan", "backbone": backbone["name"], "weights": tag,
            "layers": blocks_tag(selection), "resolution": resolution_tag(cfg["resolution"]),
            "dataset": trained_on, "category": "all", "seed": seed,
            "categories": list(OFFICIAL_CATEGORIES[trained_on])}
    adapters = {k.replace("fc.", "adapters.", 1): v.contiguous() for k, v in state.items()}
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return checkpoint.save_state(dest, adapters, {k: cfg[k] for k in checkpoint.MODEL_KEYS},
                                 meta)


def _summary(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in list(shapes.items())[:4]) + (
        ", ..." if len(shapes) > 4 else "")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="anomaly-bench-import-aprilgan",
        description="Convert the official APRIL-GAN adapters (exps/pretrained/*.pth) into a "
                    "model.pt for stage=test checkpoint=DEST.")
    ap.add_argument("source", type=Path, help="the official adapters file (.pth)")
    ap.add_argument("dest", type=Path, help="the model.pt to write")
    ap.add_argument("--trained-on", required=True, choices=sorted(PRESETS),
                    help="the dataset the adapters were trained on (mvtec_pretrained.pth: "
                         "mvtec, visa_pretrained.pth: visa)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the tested configuration "
                                                 "(e.g. backbone.weights=PATH)")
    args = ap.parse_intermixed_args(argv)
    try:
        path = convert(args.source, args.dest, args.trained_on, args.overrides)
    except AnomalyBenchError as exc:
        print(f"anomaly-bench-import-aprilgan: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"wrote {path}: test it with anomaly-bench experiment={PRESETS[args.trained_on]} "
          f"checkpoint={path}")
    return 0


def main_exit() -> None:
    """Console script ``anomaly-bench-import-aprilgan``."""
    raise SystemExit(main())


if __name__ == "__main__":
    main_exit()
