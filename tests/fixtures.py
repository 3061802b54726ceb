"""Writers of tiny datasets (a few 32x32 images) in each published layout.

Plain functions (``from fixtures import write_mvtec``; pytest puts ``tests/`` on the path
through ``tests/conftest.py``), so module-scoped fixtures can call them too. The
``make_dataset`` fixture of ``tests/conftest.py`` wraps them for ``tmp_path``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (SIZE, SIZE),
                mode: str = "RGB") -> Path:
    """A random image (``size`` is W, H) in any format PIL infers from the suffix."""
    rng = np.random.default_rng(seed)
    w, h = size
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def write_mask(path: Path, size: tuple[int, int] = (SIZE, SIZE),
               box: tuple[int, int, int, int] = (8, 8, 16, 16)) -> Path:
    """A 0/255 mask (``size`` is W, H) whose rectangle ``box`` (x0, y0, x1, y1) is the defect."""
    w, h = size
    arr = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def write_gray16(path: Path, arr: np.ndarray) -> Path:
    """A 16-bit grayscale image (PIL mode ``I;16``) of the uint16 array ``arr`` (PNG or TIFF)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint16)).save(path)
    return path


def write_broken_symlinks(folder: Path, *, pair: bool = False) -> list[Path]:
    """Two broken symlinks with image names in ``folder``, sorted by name.

    Default: ``dangling.png`` (to a missing file) and ``loop.png`` (to itself); with
    ``pair``: ``loop_a.png`` -> ``loop_b.png`` -> ``loop_a.png``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if pair:
        a, b = folder / "loop_a.png", folder / "loop_b.png"
        a.symlink_to(b.name)
        b.symlink_to(a.name)
        return [a, b]
    dangling, loop = folder / "dangling.png", folder / "loop.png"
    dangling.symlink_to("missing.png")
    loop.symlink_to(loop.name)
    return [dangling, loop]


def write_category(
    folder: Path,
    *,
    good: str = "good",
    defects: Sequence[str] = ("crack", "hole"),
    n_train: int = 3,
    n_good: int = 2,
    n_defect: int = 2,
    ext: str = ".png",
    mask_ext: str = ".png",
    mask_suffix: str | None = "_mask",
    seed: int = 0,
) -> Path:
    """One MVTec-like category; ``mask_suffix=None`` writes no ground_truth folder."""
    for i in range(n_train):
        write_image(folder / "train" / good / f"{i:03d}{ext}", seed + i)
    for i in range(n_good):
        write_image(folder / "test" / good / f"{i:03d}{ext}", seed + 100 + i)
    for d, defect in enumerate(defects):
        for i in range(n_defect):
            write_image(folder / "test" / defect / f"{i:03d}{ext}", seed + 200 + 10 * d + i)
            if mask_suffix is not None:
                write_mask(folder / "ground_truth" / defect / f"{i:03d}{mask_suffix}{mask_ext}")
    return folder


def write_mvtec(root: Path, categories: Sequence[str] = ("bottle", "cable"), **kw) -> Path:
    """MVTec AD: ``<root>/<cat>/{train/good, test/<defect>, ground_truth/<defect>/*_mask.png}``."""
    for c, cat in enumerate(categories):
        write_category(root / cat, seed=1000 * c, **kw)
    return root


def write_btad(root: Path) -> Path:
    """BTAD: 01 (bmp images, png masks), 02 (png, png), 03 (bmp, bmp); ok/ko folders."""
    exts = {"01": (".bmp", ".png"), "02": (".png", ".png"), "03": (".bmp", ".bmp")}
    for c, (cat, (ext, mext)) in enumerate(exts.items()):
        write_category(root / cat, good="ok", defects=("ko",), ext=ext, mask_ext=mext,
                       mask_suffix="", seed=1000 * c)
    return root


def write_mpdd(root: Path) -> Path:
    """MPDD: two categories, masks with the ``_mask`` suffix in one and without in the other."""
    write_category(root / "bracket_black", defects=("hole", "scratches"), mask_suffix="_mask")
    write_category(root / "tubes", defects=("anomalous",), mask_suffix="", seed=500)
    return root


def write_folder(root: Path, masks: bool = True) -> Path:
    """A custom folder: train/good, test/good, test/<defect>, optional ground_truth/<defect>."""
    return write_category(root, defects=("dent",), mask_suffix="_mask" if masks else None)


def write_stc(root: Path, *, scenes: Sequence[str] = ("01", "02"), n_video_frames: int = 12,
              n_test_frames: int = 6, size: tuple[int, int] = (SIZE, SIZE)) -> Path:
    """A tiny ShanghaiTech Campus tree: one MJPG training video and one test clip per scene.

    Test frames 3.. of each clip are anomalous, with a rectangle in the pixel mask.
    """
    import cv2

    w, h = size
    rng = np.random.default_rng(0)
    (root / "training" / "videos").mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        path = root / "training" / "videos" / f"{scene}_001.avi"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (w, h))
        for _ in range(n_video_frames):
            writer.write(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        writer.release()
        clip = f"{scene}_0014"
        labels = np.zeros(n_test_frames, np.uint8)
        labels[3:] = 1
        pixel = np.zeros((n_test_frames, h, w), np.uint8)
        pixel[3:, 4:12, 6:14] = 1
        for i in range(n_test_frames):
            write_image(root / "testing" / "frames" / clip / f"{i:03d}.jpg", seed=i, size=size)
        for name, arr in (("test_frame_mask", labels), ("test_pixel_mask", pixel)):
            (root / "testing" / name).mkdir(parents=True, exist_ok=True)
            np.save(root / "testing" / name / f"{clip}.npy", arr)
    return root


def write_aebad_s(root: Path, domains: Sequence[str] = ("same", "background",
                                                       "illumination", "view")) -> Path:
    """AeBAD-S: ``AeBAD_S/{train/good/<sub>, test/<type>/<domain>, ground_truth/<type>/<domain>}``
    with masks named as their images."""
    cat = root / "AeBAD_S"
    for s, sub in enumerate(("sub1", "sub2")):
        for i in range(3):
            write_image(cat / "train" / "good" / sub / f"{i:03d}.png", 10 * s + i)
    for d, domain in enumerate(domains):
        for i in range(2):
            write_image(cat / "test" / "good" / domain / f"{i:03d}.png", 100 + 10 * d + i)
            write_image(cat / "test" / "breakdown" / domain / f"{i:03d}.png", 200 + 10 * d + i)
            write_mask(cat / "ground_truth" / "breakdown" / domain / f"{i:03d}.png")
    return root


def write_aebad_v(root: Path, videos: Sequence[str] = ("video1", "video2", "video3"),
                  size: tuple[int, int] = (SIZE, SIZE)) -> Path:
    """AeBAD-V: ``AeBAD_V/{train/good/<sub>/*.jpg, test/<video>/<good|anomaly>/*.jpg}``, no
    masks."""
    cat = root / "AeBAD_V"
    for s, sub in enumerate(("sub1", "sub2")):
        for i in range(3):
            write_image(cat / "train" / "good" / sub / f"{i:03d}.jpg", 10 * s + i, size)
    for v, video in enumerate(videos):
        for i in range(2):
            write_image(cat / "test" / video / "good" / f"{i:03d}.jpg", 100 + 10 * v + i, size)
            write_image(cat / "test" / video / "anomaly" / f"{i:03d}.jpg", 200 + 10 * v + i,
                        size)
    return root


def write_visa(root: Path, categories: Sequence[str] = ("candle", "pcb1")) -> Path:
    """VisA: ``<cat>/Data/Images/{Normal,Anomaly}``, ``<cat>/Data/Masks/Anomaly`` and the
    one-class split file ``split_csv/1cls.csv``."""
    lines = ["object,split,label,image,mask"]
    for c, cat in enumerate(categories):
        for i in range(5):
            rel = f"{cat}/Data/Images/Normal/{i:04d}.JPG"
            write_image(root / rel, 1000 * c + i)
            lines.append(f"{cat},{'train' if i < 3 else 'test'},normal,{rel},")
        for i in range(2):
            rel = f"{cat}/Data/Images/Anomaly/{i:03d}.JPG"
            mask = f"{cat}/Data/Masks/Anomaly/{i:03d}.png"
            write_image(root / rel, 1000 * c + 50 + i)
            write_mask(root / mask)
            lines.append(f"{cat},test,anomaly,{rel},{mask}")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")
    return root


WRITERS: dict[str, Callable[..., Path]] = {
    "mvtec": write_mvtec, "btad": write_btad, "mpdd": write_mpdd, "folder": write_folder,
    "stc": write_stc, "aebad_s": write_aebad_s, "aebad_v": write_aebad_v, "visa": write_visa,
}


def compose_config(overrides: Sequence[str] = ()):
    """The run config ``anomaly-bench`` would compose from ``overrides`` (a DictConfig)."""
    from hydra import compose, initialize_config_dir

    from anomaly_bench.configs import config_dir, friendly_overrides

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return compose("config", overrides=friendly_overrides(list(overrides)))


#: A small CLIP architecture (ViT image tower of 3 blocks, width 48, 64 px; 2 text blocks).
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 64, "layers": 3, "width": 48, "patch_size": 16,
                            "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                          "layers": 2}}


def register_tiny_clip(folder: Path) -> str:
    """Register :data:`TINY_CLIP` with open_clip (config file in ``folder``); its name."""
    import json

    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Tiny-CLIP-test.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    return "Tiny-CLIP-test"


def preprocess(size: int | None = 256, crop: int | None = 224):
    """:class:`~anomaly_bench.data.Preprocess` with ImageNet statistics (a CNN's input)."""
    from anomaly_bench.backbones.base import IMAGENET_MEAN, IMAGENET_STD
    from anomaly_bench.data import Preprocess

    return Preprocess(size=size, crop=crop, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      resample="bilinear", mask_resample="nearest")
