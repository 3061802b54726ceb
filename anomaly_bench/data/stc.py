"""ShanghaiTech Campus (Luo et al., 2017) in its published layout; categories are scenes.

::

    <root>/training/videos/<scene>_<clip>.avi           normal videos only
    <root>/testing/frames/<scene>_<clip>/<frame>.jpg    test frames
    <root>/testing/test_frame_mask/<scene>_<clip>.npy   one 0/1 label per frame
    <root>/testing/test_pixel_mask/<scene>_<clip>.npy   (T, H, W), non-zero = anomalous

SPADE evaluates per scene (``01`` .. ``13``). The loaders read images and masks from
files, so each scene is materialised once into a cache next to the data: every
``frame_stride``-th frame of the training videos (consecutive frames are near duplicates)
and a PNG mask per anomalous test frame. The cache is written into a temporary folder and
renamed into place, so concurrent runs never see a partial one; it is keyed by the stride.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm.auto import tqdm

from anomaly_bench.errors import ConfigError, DataError
from anomaly_bench.paths import check_name
from anomaly_bench.types import ANOMALOUS, NORMAL, CategorySplit, SampleRecord

from .layout_utils import list_files, list_images, list_subdirs
from .registry import register_layout

_CLIP = re.compile(r"^(\d+)_(\d+)$")
CACHE_DIR = ".anomaly_bench_cache"


def _scene(name: str) -> str | None:
    m = _CLIP.match(name)
    return m.group(1) if m else None


def _frame_key(path: Path) -> tuple[int, str]:
    return (int(path.stem), path.name) if path.stem.isdigit() else (1 << 62, path.name)


@dataclass(frozen=True)
class STCLayout:
    """Reader of the ShanghaiTech Campus tree (``frame_stride``: training frame sampling)."""

    name: str = "stc"
    title: str = "ShanghaiTech Campus"
    frame_stride: int = 5

    @property
    def expected(self) -> str:
        return ("<root>/training/videos/<scene>_<clip>.avi, <root>/testing/frames/"
                "<scene>_<clip>/*.jpg, <root>/testing/test_frame_mask/<scene>_<clip>.npy and "
                "<root>/testing/test_pixel_mask/<scene>_<clip>.npy.")

    def configure(self, cfg: Mapping[str, Any]) -> STCLayout:
        """This layout with the ``dataset.frame_stride`` of the run's config."""
        stride = int(cfg.get("frame_stride", self.frame_stride))
        if stride < 1:
            raise ConfigError(f"dataset.frame_stride={stride} must be at least 1.")
        return replace(self, frame_stride=stride)

    # ------------------------------------------------------------------ layout protocol
    def categories(self, root: Path) -> list[str]:
        root = Path(root)
        train = {_scene(p.stem) for p in self._videos(root, "*")}
        test = {_scene(c) for c in self._clips(root)}
        return sorted(s for s in train & test if s)

    def split(self, root: Path, category: str) -> CategorySplit:
        root = Path(root)
        check_name(category, "dataset.category")
        videos = self._videos(root, category)
        clips = [c for c in self._clips(root) if _scene(c) == category]
        if not videos or not clips:
            raise DataError(
                f"ShanghaiTech Campus scene {category} under {root} needs training videos "
                f"{root / 'training' / 'videos'}/{category}_*.avi and test clips "
                f"{root / 'testing' / 'frames'}/{category}_*; found {len(videos)} videos and "
                f"{len(clips)} clips. Expected layout: {self.expected}"
            )
        tests = {c: self._test_clip(root, c) for c in clips}
        cache = self._materialise(root, category, videos, tests)
        train = [SampleRecord(p, NORMAL) for p in list_images(cache / "train", "frames")]
        test: list[SampleRecord] = []
        for clip, (frames, labels, _) in tests.items():
            for i, (frame, label) in enumerate(zip(frames, labels, strict=True)):
                if label:
                    mask = cache / "masks" / clip / f"{i:05d}.png"
                    test.append(SampleRecord(frame, ANOMALOUS, "anomaly", mask, clip))
                else:
                    test.append(SampleRecord(frame, NORMAL, "good", None, clip))
        return CategorySplit("stc", category, root, train, test, has_masks=True)

    # ------------------------------------------------------------------ helpers
    def _videos(self, root: Path, scene: str) -> list[Path]:
        """The training videos ``<scene>_*.avi`` (``*`` = every scene), sorted by name."""
        return list_files(root / "training" / "videos", f"{scene}_*.avi",
                          "the training videos <scene>_<clip>.avi")

    def _clips(self, root: Path) -> list[str]:
        """The test clip folders, sorted; their names become ``SampleRecord.subset``, so each
        must be a plain name (ConfigError otherwise)."""
        folder = root / "testing" / "frames"
        found = list_subdirs(folder, "one folder of test frames per clip, <scene>_<clip>")
        return [check_name(c, f"a test clip folder of {folder}") for c in found]

    def _test_clip(self, root: Path, clip: str
                   ) -> tuple[list[Path], np.ndarray, Path]:
        frames = sorted(list_images(root / "testing" / "frames" / clip, "test frames"),
                        key=_frame_key)
        label_path = root / "testing" / "test_frame_mask" / f"{clip}.npy"
        pixel_path = root / "testing" / "test_pixel_mask" / f"{clip}.npy"
        for p in (label_path, pixel_path):
            if not p.is_file():
                raise DataError(f"Missing {p}: every test clip of ShanghaiTech Campus needs its "
                                f"frame labels and pixel masks. Expected layout: {self.expected}")
        labels = np.load(label_path).reshape(-1)
        if len(labels) != len(frames):
            raise DataError(f"{label_path} has {len(labels)} frame labels but "
                            f"{root / 'testing' / 'frames' / clip} has {len(frames)} frames.")
        return frames, labels.astype(bool), pixel_path

    def _cache_root(self, root: Path) -> Path:
        base = root / CACHE_DIR
        try:
            base.mkdir(exist_ok=True)
            if os.access(base, os.W_OK):
                return base
        except OSError:
            pass
        import hashlib

        digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
        return Path.home() / ".cache" / "anomaly_bench" / f"stc-{digest}"

    def _materialise(self, root: Path, scene: str, videos: list[Path],
                     tests: Mapping[str, tuple[list[Path], np.ndarray, Path]]) -> Path:
        final = self._cache_root(root) / f"stc-stride{self.frame_stride}" / scene
        if (final / "DONE").is_file():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{scene}-{uuid.uuid4().hex}-"))
        try:
            (tmp / "train").mkdir()
            for video in tqdm(videos, desc=f"STC {scene}: frames", unit="video", leave=False):
                self._extract(video, tmp / "train")
            for clip, (frames, labels, pixel_path) in tests.items():
                if labels.any():
                    self._write_masks(pixel_path, frames, labels, tmp / "masks" / clip)
            (tmp / "DONE").write_text("ok\n")
            try:
                os.replace(tmp, final)
            except OSError:  # another process finished first: use its cache
                if not (final / "DONE").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _extract(self, video: Path, out: Path) -> None:
        cap = cv2.VideoCapture(str(video))
        if not cap.isOpened():
            raise DataError(f"cannot open the training video {video} (OpenCV could not decode "
                            "it); re-download or re-encode the file.")
        i = kept = 0
        while True:
            if i % self.frame_stride == 0:
                ok, frame = cap.read()
                if not ok:
                    break
                cv2.imwrite(str(out / f"{video.stem}_{i:05d}.png"), frame)
                kept += 1
            elif not cap.grab():  # skipped frames are not decoded
                break
            i += 1
        cap.release()
        if kept == 0:
            raise DataError(f"the training video {video} has no readable frame.")

    def _write_masks(self, pixel_path: Path, frames: list[Path], labels: np.ndarray,
                     out: Path) -> None:
        masks = np.load(pixel_path, mmap_mode="r")
        first = cv2.imread(str(frames[0]), cv2.IMREAD_UNCHANGED)
        hw = None if first is None else first.shape[:2]
        if masks.ndim != 3 or masks.shape[0] != len(frames) or (hw and masks.shape[1:] != hw):
            raise DataError(
                f"{pixel_path} has shape {tuple(masks.shape)}; expected (frames, height, width) "
                f"= ({len(frames)}, {hw[0] if hw else 'H'}, {hw[1] if hw else 'W'}) to match "
                f"{frames[0].parent}."
            )
        out.mkdir(parents=True)
        for i in np.flatnonzero(labels):
            mask = (np.asarray(masks[i]) > 0).astype(np.uint8) * 255
            cv2.imwrite(str(out / f"{i:05d}.png"), mask)


STC = register_layout(STCLayout())
