"""A small procedural dataset in the MVTec AD layout, generated on first use.

Three categories: two textures (``stripes``: oriented woven stripes; ``grain``: a
leather-like grain with low-frequency shading) and one object (``rotated_part``: a
screw-like part with a head on a plain background, shown with small position jitter and a
random quarter-turn rotation, so alignment has something to undo). Each category has
three defect types with 0/255 pixel masks.

Everything is a function of the arguments of :func:`ensure_synthetic`: the same arguments
write the same files byte for byte. ``manifest.json`` records the generator version, the
arguments and the rotation ``k`` (quarter turns, counter-clockwise as ``np.rot90``) of
every image. The dataset is written into a temporary sibling folder and renamed into
place, so concurrent runs never see a half-written dataset.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from anomaly_bench.errors import ConfigError, DataError

from .mvtec import MVTecLikeLayout
from .registry import register_layout

SYNTHETIC_CATEGORIES = ("stripes", "grain", "rotated_part")
GENERATOR_VERSION = 1
GENERATOR_NAME = "anomaly_bench.data.synthetic"
MANIFEST = "manifest.json"
DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "stripes": ("misweave", "scratch", "stain"),
    "grain": ("hole", "scratch", "stain"),
    "rotated_part": ("contamination", "missing_piece", "scratch"),
}

SYNTHETIC = register_layout(
    MVTecLikeLayout(name="synthetic", title="synthetic", known_categories=SYNTHETIC_CATEGORIES)
)

Array = np.ndarray


# ---------------------------------------------------------------------- primitives
@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates ``(yy, xx)`` of a size x size image (read-only)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _smooth(rng: np.random.Generator, size: int, cells: int) -> Array:
    """Low-frequency noise (about unit variance) from a ``cells`` grid, bicubic-upsampled."""
    coarse = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    big = cv2.resize(coarse, (size + 3 * size // cells,) * 2, interpolation=cv2.INTER_CUBIC)
    off = 3 * size // cells // 2
    return big[off : off + size, off : off + size]


def _noise(rng: np.random.Generator, size: int, sigma: float) -> Array:
    """Gaussian-blurred white noise normalised to zero mean, unit variance."""
    n = rng.standard_normal((size, size)).astype(np.float32)
    if sigma > 0.3:
        n = cv2.GaussianBlur(n, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    return (n - n.mean()) / (n.std() + 1e-6)


def _blur(a: Array, sigma: float) -> Array:
    return cv2.GaussianBlur(a, (0, 0), max(sigma, 0.3), borderType=cv2.BORDER_REFLECT)


def _blob(
    rng: np.random.Generator, size: int, cy: float, cx: float, radius: float,
    roughness: float = 0.35, aspect: tuple[float, float] = (0.6, 1.0),
    angle: float | None = None,
) -> Array:
    """Soft (anti-aliased) irregular elliptic blob in [0, 1], semi-axis ``radius`` px.

    The long axis points along ``angle`` (radians; random when None).
    """
    yy, xx = _grid(size)
    ang = rng.uniform(0, math.pi) if angle is None else angle
    a = radius
    b = radius * rng.uniform(*aspect)
    dy, dx = yy - cy, xx - cx
    u = (dx * math.cos(ang) + dy * math.sin(ang)) / a
    v = (-dx * math.sin(ang) + dy * math.cos(ang)) / b
    r = np.sqrt(u * u + v * v)
    wobble = _smooth(rng, size, max(int(size / max(radius, 1.0)), 4)) * roughness
    f = (r - 1.0 - wobble) * b  # roughly a signed distance in pixels
    return np.clip(0.5 - f / 1.5, 0.0, 1.0)


def _curve(
    rng: np.random.Generator, size: int, start: tuple[float, float], length: float,
    width: float, bend: float = 0.25,
) -> Array:
    """Soft thin curved line (quadratic Bezier) in [0, 1], starting at ``(y, x)``."""
    ang = rng.uniform(0, 2 * math.pi)
    p0 = np.array(start[::-1], np.float64)  # (x, y) for OpenCV
    d = np.array([math.cos(ang), math.sin(ang)])
    p2 = p0 + d * length
    normal = np.array([-d[1], d[0]])
    p1 = (p0 + p2) / 2 + normal * length * rng.uniform(-bend, bend)
    t = np.linspace(0, 1, 48)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    canvas = np.zeros((size, size), np.uint8)
    thick = max(round(width), 1)
    cv2.polylines(canvas, [np.round(pts * 16).astype(np.int32)], False, 255, thick,
                  cv2.LINE_AA, shift=4)
    return _blur(canvas.astype(np.float32) / 255.0, 0.5 * width / 2)


def _mask_of(alpha: Array, threshold: float = 0.25) -> Array:
    return alpha > threshold


# ---------------------------------------------------------------------- textures
def _stripes(rng: np.random.Generator, size: int, defect: str | None) -> tuple[Array, Array | None]:
    """Woven stripes at about 35 degrees with thread noise and slow waviness."""
    s = size / 256
    yy, xx = _grid(size)
    theta = math.radians(35 + rng.normal(0, 1.0))
    period = 11.0 * s * (1 + rng.normal(0, 0.02))
    phase = rng.uniform(0, 2 * math.pi)
    warp = _smooth(rng, size, 4) * 0.5
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    pert = np.zeros((size, size), np.float32)
    mask = None
    if defect == "misweave":  # a band of threads pulled out of phase, along the stripes
        r = rng.uniform(20, 32) * s
        cy, cx = rng.uniform(0.25, 0.75, 2) * size
        region = _blob(rng, size, cy, cx, r, roughness=0.2, aspect=(0.3, 0.45),
                       angle=theta + math.pi / 2)
        region = _blur(region, 2.0 * s)
        pert = region * rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 0.9) * math.pi
        mask = _mask_of(region, 0.3)
    main = 0.5 + 0.5 * np.sin(2 * math.pi * u / period + phase + warp + pert)
    cross = 0.5 + 0.5 * np.sin(2 * math.pi * v / (period * 0.45) + rng.uniform(0, 6.3))
    thread = _noise(rng, size, 0.8 * s)
    tex = 0.72 * main**1.3 + 0.18 * cross * main + 0.07 * thread
    tex += 0.05 * _smooth(rng, size, 3)
    dark = np.array([0.30, 0.19, 0.14], np.float32)
    light = np.array([0.74, 0.58, 0.42], np.float32)
    img = dark + (light - dark) * tex[..., None]
    img += 0.02 * rng.standard_normal(img.shape).astype(np.float32)
    if defect in ("scratch", "stain"):
        img, mask = _texture_defect(rng, img, defect, s)
    return img, mask


def _grain(rng: np.random.Generator, size: int, defect: str | None) -> tuple[Array, Array | None]:
    """Leather-like grain: multi-scale noise with creases and low-frequency shading."""
    s = size / 256
    fine = _noise(rng, size, 0.7 * s)
    med = _noise(rng, size, 2.2 * s)
    coarse = _noise(rng, size, 5.0 * s)
    creases = np.exp(-(med**2) * 6.0)  # thin dark valleys along the zero-crossings
    tex = 0.35 * fine + 0.3 * coarse - 0.9 * creases
    shading = 0.07 * _smooth(rng, size, 3)
    base = np.array([0.56, 0.49, 0.42], np.float32)
    img = base * (1 + 0.12 * tex[..., None]) + shading[..., None]
    mask = None
    if defect == "hole":
        r = rng.uniform(3.5, 6.5) * s
        cy, cx = rng.uniform(0.15, 0.85, 2) * size
        hole = _blob(rng, size, cy, cx, r, roughness=0.2, aspect=(0.7, 1.0))
        rim = np.clip(_blur(hole, 2.0 * s) * 1.6 - hole, 0, 1)
        img = img * (1 - 0.6 * hole[..., None]) + 0.05 * hole[..., None]
        img = img + 0.06 * rim[..., None]
        mask = _mask_of(np.maximum(hole, rim * 0.5), 0.3)
    elif defect is not None:
        img, mask = _texture_defect(rng, img, defect, s)
    return img, mask


def _texture_defect(
    rng: np.random.Generator, img: Array, defect: str, s: float
) -> tuple[Array, Array]:
    """A scratch (thin bright or dark curve) or a stain (tinted irregular blob) on a texture."""
    size = img.shape[0]
    if defect == "scratch":
        start = tuple(rng.uniform(0.2, 0.8, 2) * size)
        line = _curve(rng, size, start, rng.uniform(35, 70) * s, rng.uniform(1.5, 2.5) * s)
        sign = rng.choice([-1.0, 1.0])
        img = img + sign * rng.uniform(0.12, 0.18) * line[..., None]
        return img, _mask_of(_blur(line, 1.0 * s), 0.1)
    if defect == "stain":
        r = rng.uniform(10, 18) * s
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        blob = _blob(rng, size, cy, cx, r)
        soft = _blur(blob, 1.5 * s)
        dark, light = (0.75, 0.80, 0.95), (1.2, 1.12, 0.92)  # oil-like or bleached
        tint = np.array(dark if rng.random() < 0.5 else light, np.float32)
        img = img * (1 + (tint - 1) * rng.uniform(0.7, 1.0) * soft[..., None])
        return img, _mask_of(blob, 0.5)
    raise ValueError(defect)


# ---------------------------------------------------------------------- object
def _box_sdf(x: Array, y: Array, cx: float, hw: float, hh: float, radius: float) -> Array:
    """Signed distance (px) to a rounded box centred at (cx, 0) with half sizes hw, hh."""
    qx = np.abs(x - cx) - (hw - radius)
    qy = np.abs(y) - (hh - radius)
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0) - radius


def _rotated_part(
    rng: np.random.Generator, size: int, defect: str | None
) -> tuple[Array, Array | None, int]:
    """A screw-like part (head, threaded shaft, pointed tip) on a plain bright background.

    Drawn head-left, shaft-right, jittered by a few pixels, then turned by ``k`` quarter
    turns (``k`` uniform in 0..3, returned with the image).
    """
    s = size / 256
    yy, xx = _grid(size)
    scale = s * (1 + rng.normal(0, 0.015))
    cy = size / 2 + rng.uniform(-8, 8) * s
    cx = size / 2 + rng.uniform(-8, 8) * s
    x, y = (xx - cx) / scale, (yy - cy) / scale  # part coordinates, 256-px units
    px = 1.0 / scale  # one image pixel in part units

    head = _box_sdf(x, y, -60, 11, 25, 5)
    shaft = _box_sdf(x, y, 6, 52, 10.5, 1.5)
    half = np.clip((86 - x) / 28, 0, 1) * 10.5  # tapered tip from x=58 to x=86
    tip = np.maximum(np.abs(y) - half, np.maximum(58 - x, x - 86)) * 0.94
    sdf = np.minimum(np.minimum(head, shaft), tip) / px  # in image pixels
    alpha = np.clip(0.5 - sdf, 0, 1)
    mask = None
    if defect == "missing_piece":
        if rng.random() < 0.6:  # bite out of the shaft edge
            bx, by = rng.uniform(-35, 55), rng.choice([-1.0, 1.0]) * 10.5
        else:  # chipped head corner
            bx, by = rng.uniform(-68, -52), rng.choice([-1.0, 1.0]) * 24
        r = rng.uniform(5.5, 8.0) * scale
        chunk = _blob(rng, size, cy + by * scale, cx + bx * scale, r, roughness=0.3,
                      aspect=(0.7, 1.0))
        mask = (alpha > 0.5) & (chunk > 0.5)
        alpha = alpha * (1 - chunk)

    # metal shading: cylinder profile, helical threads, a specular line, the head's groove
    prof = np.sqrt(np.clip(1 - (y / 10.5) ** 2, 0, 1))
    threads = 0.5 + 0.5 * np.sin(2 * math.pi * (x + 0.35 * y) / 7.0)
    on_thread = np.clip((x + 28) / 3, 0, 1)
    shaft_shade = 0.22 + 0.45 * prof * (1 - 0.35 * on_thread * threads)
    shaft_shade += 0.22 * np.exp(-(((y + 3.5) / 2.2) ** 2)) * (1 - 0.5 * on_thread * threads)
    head_prof = np.sqrt(np.clip(1 - (y / 25) ** 2, 0, 1))
    head_shade = 0.25 + 0.42 * head_prof - 0.18 * np.exp(-(((x + 57) / 1.8) ** 2))
    in_head = np.clip((-49 - x) / 2, 0, 1)
    metal = in_head * head_shade + (1 - in_head) * shaft_shade
    metal += 0.015 * _noise(rng, size, 0.7)

    bg = 0.80 + 0.025 * _smooth(rng, size, 2)
    shadow = _blur(np.roll(alpha, (round(3 * s), round(3 * s)), (0, 1)), 4 * s)
    bg = bg * (1 - 0.22 * shadow)
    img = bg * (1 - alpha) + metal * alpha

    if defect == "scratch":
        start = (cy + rng.uniform(-5, 5) * scale, cx + rng.uniform(-35, 35) * scale)
        line = _curve(rng, size, start, rng.uniform(14, 24) * s, 1.6 * s, bend=0.15)
        line = line * (alpha > 0.5)
        img = img + rng.choice([-1.0, 1.0]) * 0.2 * line
        mask = _mask_of(_blur(line, 1.0 * s), 0.1)
    elif defect == "contamination":
        by, bx = rng.uniform(-8, 8), rng.uniform(-62, 70)
        blob = _blob(rng, size, cy + by * scale, cx + bx * scale, rng.uniform(4, 7) * s)
        img = img * (1 - 0.35 * _blur(blob, 1.0 * s))
        mask = _mask_of(blob, 0.5)
    img = img + 0.01 * rng.standard_normal(img.shape).astype(np.float32)
    k = int(rng.integers(0, 4))
    img = np.ascontiguousarray(np.rot90(img, k))
    if mask is not None:
        mask = np.ascontiguousarray(np.rot90(mask, k))
    return img, mask, k


# ---------------------------------------------------------------------- dataset
Renderer = Callable[..., tuple]  # (rng, size, defect) -> (image, mask[, k])
_RENDERERS: dict[str, Renderer] = {
    "stripes": _stripes, "grain": _grain, "rotated_part": _rotated_part,
}


def render(category: str, seed: int, split: str, defect: str | None, index: int,
           size: int = 256) -> tuple[Array, Array | None, int]:
    """One image as uint8 (H, W) or (H, W, 3), its bool mask (None when normal) and rotation k.

    Each image has its own random stream derived from (seed, category, split, defect,
    index), so images do not depend on generation order.
    """
    cat_i = SYNTHETIC_CATEGORIES.index(category)
    split_i = ("train", "test").index(split)
    defect_i = 0 if defect is None else 1 + DEFECT_TYPES[category].index(defect)
    rng = np.random.default_rng([int(seed), GENERATOR_VERSION, cat_i, split_i, defect_i, index])
    for _ in range(8):  # re-draw the rare defect that falls outside the image or the part
        out = _RENDERERS[category](rng, size, defect)
        img, mask = out[0], out[1]
        k = out[2] if len(out) > 2 else 0
        if defect is None or mask.sum() >= 4:
            break
    img8 = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return img8, mask, k


def _args(seed: int, n_train: int, n_test_good: int, n_test_defect: int, size: int) -> dict:
    return {"seed": int(seed), "n_train": int(n_train), "n_test_good": int(n_test_good),
            "n_test_defect": int(n_test_defect), "size": int(size)}


def _save_png(path: Path, array: Array) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _generate(out: Path, args: dict) -> None:
    """Write the whole dataset and, last, its manifest into the (fresh) folder ``out``."""
    seed, size = args["seed"], args["size"]
    manifest = {"generator": GENERATOR_NAME, "version": GENERATOR_VERSION, "arguments": args,
                "categories": {}}
    for cat in SYNTHETIC_CATEGORIES:
        rotations: dict[str, int] = {}
        jobs = [("train", None, args["n_train"]), ("test", None, args["n_test_good"])]
        jobs += [("test", d, args["n_test_defect"]) for d in DEFECT_TYPES[cat]]
        for split, defect, count in jobs:
            folder = out / cat / split / (defect or "good")
            folder.mkdir(parents=True, exist_ok=True)
            if defect is not None:
                (out / cat / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img, mask, k = render(cat, seed, split, defect, i, size)
                _save_png(folder / f"{i:03d}.png", img)
                rotations[f"{split}/{defect or 'good'}/{i:03d}.png"] = k
                if mask is not None:
                    _save_png(out / cat / "ground_truth" / defect / f"{i:03d}_mask.png",
                              mask.astype(np.uint8) * 255)
        manifest["categories"][cat] = {
            "kind": "object" if cat == "rotated_part" else "texture",
            "defect_types": list(DEFECT_TYPES[cat]),
            "rotations": rotations,
        }
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    (out / MANIFEST).write_text(text, encoding="utf-8")


def read_manifest(root: Path) -> dict | None:
    """The parsed ``manifest.json`` of a generated root, or None when absent or unreadable."""
    try:
        data = json.loads((Path(root) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("generator") == GENERATOR_NAME else None


def _matches(root: Path, args: dict) -> bool:
    m = read_manifest(root)
    return (
        m is not None
        and m.get("version") == GENERATOR_VERSION
        and m.get("arguments") == args
        and all((root / c / "train" / "good").is_dir() for c in SYNTHETIC_CATEGORIES)
    )


def _replaceable(root: Path) -> bool:
    """True when ``root`` is absent, empty, or a dataset written by this generator."""
    if not root.exists():
        return True
    if root.is_dir() and (read_manifest(root) is not None or not any(root.iterdir())):
        return True
    return False


def _publish(tmp: Path, root: Path, args: dict) -> None:
    """Rename ``tmp`` to ``root``; if another process got there first with the same dataset,
    keep theirs. A stale generated root is moved aside and deleted."""
    for _ in range(20):
        if _matches(root, args):
            return
        if root.exists():
            if not _replaceable(root):
                raise _not_ours(root)
            old = root.parent / f".{root.name}.old-{uuid.uuid4().hex}"
            try:
                os.rename(root, old)
            except FileNotFoundError:
                pass  # someone else moved it already
            else:
                if _matches(old, args):  # a racing process published just now: keep theirs
                    try:
                        os.rename(old, root)
                        continue
                    except OSError:
                        pass
                shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, root)
            return
        except OSError:
            continue  # root re-appeared (another process won the race): check it again
    raise DataError(
        f"Could not move the generated synthetic dataset into {root}: another process keeps "
        f"replacing it. Use a different dataset.root (or data_root) for each configuration."
    )


def _not_ours(root: Path) -> DataError:
    return DataError(
        f"{root} exists but is not a synthetic dataset written by anomaly-bench (it has no "
        f"{MANIFEST} from the generator), so it will not be overwritten. Point dataset.root "
        f"(or data_root) somewhere else, or delete that folder."
    )


def ensure_synthetic(
    root: Path,
    seed: int = 0,
    n_train: int = 32,
    n_test_good: int = 12,
    n_test_defect: int = 6,
    size: int = 256,
) -> Path:
    """The synthetic dataset at ``root``, generated (or regenerated) when missing or stale.

    ``n_test_defect`` images are written per defect type. A root whose manifest matches
    the arguments is reused as is; one written with other arguments is replaced.
    """
    for key, val, low in (("n_train", n_train, 1), ("n_test_good", n_test_good, 0),
                          ("n_test_defect", n_test_defect, 1), ("size", size, 32)):
        if int(val) < low:
            raise ConfigError(f"Synthetic dataset: {key}={val} must be at least {low}.")
    root = Path(root).expanduser()
    args = _args(seed, n_train, n_test_good, n_test_defect, size)
    if _matches(root, args):
        return root
    if not _replaceable(root):
        raise _not_ours(root)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is meant to be shared
    except OSError as exc:
        raise DataError(
            f"Cannot create the synthetic dataset under {root.parent}: {exc}. Set data_root "
            f"(or dataset.root) to a writable folder."
        ) from exc
    try:
        _generate(tmp, args)
        _publish(tmp, root, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
