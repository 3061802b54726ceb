"""Rotation alignment in 90 degree steps by ORB feature matching against a reference image.

As in the PaDiM source document's screw experiment: ORB keypoints of one reference
training image (``alignment.reference``, by default the first); every training and test
image is matched against them and turned by the multiple of 90 degrees with the best
match score, so all parts share the reference's orientation before feature extraction.

ORB descriptors are rotation invariant, so a plain match count cannot tell the four
rotations apart. Each match that passes Lowe's ratio test instead votes for the quarter
turn closest to the difference of the two keypoints' orientations (a keypoint of an image
turned by a quarter turn has its orientation shifted by 90 degrees); the score of a
rotation is its number of votes. Images with fewer than ``min_matches`` good matches, or
no clear winner, are left unrotated and reported as fallbacks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from anomaly_bench.data.loading import read_image
from anomaly_bench.errors import ConfigError, DataError

_TRANSPOSE = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180,
              3: Image.Transpose.ROTATE_270}


def rotate_pil(image: Image.Image, k: int) -> Image.Image:
    """``image`` turned by ``k`` quarter turns counter-clockwise (pixel-equal to np.rot90)."""
    k %= 4
    return image if k == 0 else image.transpose(_TRANSPOSE[k])


def _gray(image: np.ndarray | Image.Image, max_side: int) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr[..., :3], cv2.COLOR_RGB2GRAY)
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    scale = max_side / max(arr.shape)
    if scale < 1:
        arr = cv2.resize(arr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return arr


@dataclass
class AlignResult:
    """Quarter turns per image path (``str(path)`` -> k) and the paths that fell back to 0."""

    rotations: dict[str, int] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)


class OrbRotationAligner:
    """Chooses, per image, the quarter turn that best matches the reference's orientation."""

    def __init__(self, reference: np.ndarray | Image.Image, *, n_features: int = 1000,
                 ratio: float = 0.75, min_matches: int = 10, max_side: int = 512) -> None:
        self.ratio, self.min_matches, self.max_side = ratio, min_matches, max_side
        self.orb = cv2.ORB_create(nfeatures=n_features)
        self.matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
        kps, desc = self.orb.detectAndCompute(_gray(reference, max_side), None)
        if desc is None or len(kps) < max(2, min_matches):
            raise DataError(
                f"the alignment reference image has {0 if desc is None else len(kps)} ORB "
                f"keypoints, fewer than alignment.min_matches={min_matches}; pick a textured "
                "reference with alignment.reference=INDEX or PATH."
            )
        self.ref_angles = np.array([kp.angle for kp in kps], dtype=np.float64)
        self.ref_desc = desc

    def rotation(self, image: np.ndarray | Image.Image) -> tuple[int | None, np.ndarray]:
        """(k, votes per k in 0..3) for one image; k is None when it must fall back."""
        kps, desc = self.orb.detectAndCompute(_gray(image, self.max_side), None)
        votes = np.zeros(4, dtype=np.int64)
        if desc is None or len(kps) < 2:
            return None, votes
        pairs = self.matcher.knnMatch(desc, self.ref_desc, k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < self.ratio * p[1].distance]
        if len(good) < self.min_matches:
            return None, votes
        img_angles = np.array([kps[m.queryIdx].angle for m in good])
        ref_angles = self.ref_angles[[m.trainIdx for m in good]]
        # An image turned clockwise on screen by j quarter turns has its keypoint angles
        # (OpenCV: degrees, y pointing down) raised by 90 j; k = j counter-clockwise
        # quarter turns undo it.
        k = np.rint(((img_angles - ref_angles) % 360.0) / 90.0).astype(np.int64) % 4
        votes = np.bincount(k, minlength=4)
        best = np.flatnonzero(votes == votes.max())
        return (int(best[0]) if len(best) == 1 else None), votes

    def align_all(self, paths: Sequence[Path | str], desc: str = "align") -> AlignResult:
        """Quarter turns of every image in ``paths`` (unreadable images raise DataError)."""
        out = AlignResult()
        for path in tqdm(paths, desc=desc, unit="img", leave=False):
            arr = np.asarray(read_image(path))  # as the loader reads it (EXIF, bit depth)
            k, _ = self.rotation(arr)
            if k is None:
                out.fallbacks.append(str(path))
                k = 0
            out.rotations[str(path)] = k
        return out


def _reference_image(ref: Any, train_paths: Sequence[Path]) -> Path:
    if ref is None:
        if not train_paths:
            raise DataError("alignment needs a reference image but the training set is empty; "
                            "set alignment.reference=PATH.")
        return Path(train_paths[0])
    if isinstance(ref, bool):
        raise ConfigError(f"alignment.reference={ref} must be null, an index or a path.")
    if isinstance(ref, int) or (isinstance(ref, str) and ref.lstrip("-").isdigit()):
        i = int(ref)
        if not -len(train_paths) <= i < len(train_paths):
            raise ConfigError(
                f"alignment.reference={i} is out of range: the training set has "
                f"{len(train_paths)} images (use 0..{len(train_paths) - 1} or a path)."
            )
        return Path(train_paths[i])
    path = Path(str(ref)).expanduser()
    if not path.is_file():
        raise DataError(f"alignment.reference={path} does not exist; expected an image file, "
                        "an index into the training images, or null for the first one.")
    return path


def build_aligner(cfg: Mapping[str, Any], train_paths: Sequence[Path]
                  ) -> OrbRotationAligner | None:
    """The aligner described by the ``alignment`` config group (None for ``none``)."""
    name = cfg.get("name", "none")
    if name == "none":
        return None
    if name != "orb90":
        raise ConfigError(f"alignment={name} is unknown; available: none, orb90.")
    ref = _reference_image(cfg.get("reference"), train_paths)
    try:
        image = np.asarray(read_image(ref))
    except DataError as exc:
        raise DataError(f"alignment.reference={ref} is not a readable image: {exc}") from None
    return OrbRotationAligner(image, n_features=int(cfg.get("n_features", 1000)),
                              ratio=float(cfg.get("ratio", 0.75)),
                              min_matches=int(cfg.get("min_matches", 10)),
                              max_side=int(cfg.get("max_side", 512)))
