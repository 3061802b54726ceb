"""``aupro_200`` and ``aupro_200_per_image`` against the repositories' own PRO functions.

APRIL-GAN's ``cal_pro_score`` (``test.py`` of ByChelsea/VAND-APRIL-GAN, after cflow-ad)
and MMR's ``compute_pro`` (``utils/common.py`` of zhangzilongc/MMR) are imported from the
checkouts given by ``--aprilgan PATH`` and ``--mmr PATH`` (nothing of them is copied
here) and called on the same maps and masks as anomaly-bench's metrics. MMR's caller
averages the list ``compute_pro`` returns over the anomalous images; so does the
comparison. Run-time patches they need on current NumPy and pandas (listed in the
output): ``np.bool`` (removed in NumPy 1.24) is ``bool`` while ``compute_pro`` runs, and
``pandas.DataFrame.append`` (removed in pandas 2) is a row concatenation. Importing
APRIL-GAN's ``test.py`` puts the checkout first on ``sys.path`` (its ``open_clip``,
``dataset``, ``model`` packages); nothing else of it runs.

Cases, each over ``--seeds`` seeded draws of ``--images`` maps of ``--size`` pixels:

- ``random``: smooth noise plus a bump on 1-3 elliptic and rectangular defect regions per
  anomalous image, a third of the images normal, in float64 and in float32 (the dtype of
  both repositories' maps);
- ``wide``: the same maps scaled and shifted into a range of about 1e3 (float32);
- degenerate: a constant map; maps equal to the masks (a perfect separation: every kept
  FPR is 0, nothing to rescale); a single anomalous image whose mask covers all of it
  (no defect-free pixel).

Printed: per case the largest absolute difference between ours and theirs over the
seeds where both are numbers, and how each side answers where one is not a number (the
repositories' NaN or exception, ours an empty cell). Both repositories build their
thresholds with ``np.arange(lo, hi, (hi - lo) / 200)``, which by rounding gives a 201st
threshold for a few score ranges; those draws are counted and compared separately (ours
has 200 always; see ``anomaly_bench/metrics/pro200.py``).

    python benchmarks/vs_repository_pro.py --aprilgan /path/to/VAND-APRIL-GAN \\
        --mmr /path/to/MMR [--seeds 20] [--images 8] [--size 96] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from vs_anomalib import machine_line
from vs_aprilgan_official import stub_pkg_resources

from anomaly_bench.metrics import aupro_200, aupro_200_per_image

PATCHES = [
    "np.bool -> bool while MMR's compute_pro runs (NumPy >= 1.24 removed the alias)",
    "pandas.DataFrame.append(row, ignore_index=True) -> pd.concat (pandas >= 2 removed it)",
]


# ---------------------------------------------------------------------- their functions
def _load(name: str, path: Path, first_on_path: Path):
    sys.path.insert(0, str(first_on_path))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_aprilgan(root: Path):
    """``cal_pro_score`` from the APRIL-GAN checkout's ``test.py``."""
    if stub_pkg_resources():
        PATCHES.append("stub module pkg_resources whose packaging is the packaging package "
                       "(APRIL-GAN's prompt_ensemble.py imports it; setuptools >= 81 no "
                       "longer ships it)")
    return _load("aprilgan_test", root / "test.py", root).cal_pro_score


def load_mmr(root: Path):
    """``compute_pro`` from the MMR checkout's ``utils/common.py``, patched as listed."""
    import pandas as pd

    if not hasattr(pd.DataFrame, "append"):
        def append(self, row, ignore_index=False):
            return pd.concat([self, pd.DataFrame([row])], ignore_index=ignore_index)
        pd.DataFrame.append = append
    compute_pro = _load("mmr_common", root / "utils" / "common.py", root).compute_pro

    def call(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> float:
        had = hasattr(np, "bool")
        saved = getattr(np, "bool", None)
        np.bool = bool
        try:
            return float(np.mean(compute_pro(maps, masks, labels)))
        finally:
            if had:
                np.bool = saved
            else:
                del np.bool
    return call


# ---------------------------------------------------------------------- inputs
def draw(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded maps (float32) and masks (0/1 int): smooth noise, a bump on the defects."""
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=int)
    for i in range(n):
        if i % 3 == 2:
            continue  # a third normal
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(size // 8, size - size // 8, 2)
            ry, rx = rng.integers(2, size // 6, 2)
            if rng.random() < 0.5:
                region = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            else:
                region = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
            masks[i][region] = 1
    noise = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), (0, 2, 2))
    bump = ndimage.gaussian_filter(masks.astype(float), (0, 3, 3))
    maps = noise * 4 + bump * rng.uniform(0.3, 2.0)
    return maps.astype(np.float32), masks


def n_thresholds(maps: np.ndarray) -> int:
    lo, hi = maps.min(), maps.max()
    return len(np.arange(lo, hi, (hi - lo) / 200)) if hi > lo else 0


# ---------------------------------------------------------------------- comparison
def ours(maps: np.ndarray, masks: np.ndarray) -> tuple[float | None, float | None]:
    m, k = torch.from_numpy(maps), torch.from_numpy(masks.astype(bool))
    return aupro_200(m, k), aupro_200_per_image(m, k)


def theirs(fn, *a) -> float | str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            v = float(fn(*a))
        except Exception as e:
            return f"{type(e).__name__}"
    return "NaN" if math.isnan(v) else v


def compare(cases, april, mmr) -> list[dict]:
    rows = []
    for name, draws in cases:
        row = {"case": name, "n": 0, "answers": set(),
               **{f"{k}{x}": [] for k in ("april", "mmr") for x in ("", "_201", "_own")}}
        for maps, masks in draws:
            labels = masks.reshape(len(masks), -1).max(1)
            a_ours, m_ours = ours(maps, masks)
            a_theirs = theirs(april, masks, maps)
            m_theirs = theirs(mmr, maps, masks, labels)
            if maps.dtype == np.float32:  # their own answer on the same maps in float64
                wide = maps.astype(np.float64)
                a_64, m_64 = theirs(april, masks, wide), theirs(mmr, wide, masks, labels)
            else:
                a_64 = m_64 = None
            row["n"] += 1
            extra_a = n_thresholds(maps) == 201
            extra_m = any(n_thresholds(m) == 201 for m in maps[labels != 0])
            for key, o, t, t64, extra in (("april", a_ours, a_theirs, a_64, extra_a),
                                          ("mmr", m_ours, m_theirs, m_64, extra_m)):
                if isinstance(t, float) and o is not None:
                    row[f"{key}_201" if extra else key].append(abs(o - t))
                    if isinstance(t64, float) and not extra:
                        row[f"{key}_own"].append(abs(t - t64))
                else:
                    row["answers"].add(f"{'APRIL-GAN' if key == 'april' else 'MMR'}: theirs "
                                       f"{t if isinstance(t, str) else f'{t:.4f}'}, ours "
                                       f"{'empty' if o is None else f'{o:.4f}'}")
        rows.append(row)
    return rows


def report(rows: list[dict], args, revisions: str) -> str:
    def cell(diffs):
        return f"{max(diffs):.1e} ({len(diffs)})" if diffs else "-"

    lines = [
        "# anomaly-bench PRO vs the repositories' own functions", "",
        f"{machine_line()}; {revisions}; {args.seeds} seeded draws per case of "
        f"{args.images} maps of {args.size} x {args.size} px (float32).", "",
        "Per repository: the largest |ours - theirs| over the draws where both are numbers "
        "(their count), over the draws where their np.arange gives 201 thresholds, and, for "
        "float32 maps, |theirs on the float32 maps - theirs on the same maps in float64| "
        "(their thresholds are float32 arithmetic then; ours are lo + k (hi - lo) / 200 "
        "exactly, compared in float32).", "",
        "| case | draws | APRIL-GAN | APRIL-GAN, 201 thresholds | APRIL-GAN f32 vs f64 | "
        "MMR (mean) | MMR, 201 thresholds | MMR f32 vs f64 | where one side is not a "
        "number |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['n']} | {cell(r['april'])} | {cell(r['april_201'])} | "
                     f"{cell(r['april_own'])} | {cell(r['mmr'])} | {cell(r['mmr_201'])} | "
                     f"{cell(r['mmr_own'])} | {'; '.join(sorted(r['answers'])) or '-'} |")
    lines += ["", "Run-time patches:", ""] + [f"- {p}" for p in PATCHES]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aprilgan", required=True, type=Path, help="a VAND-APRIL-GAN checkout")
    ap.add_argument("--mmr", required=True, type=Path, help="a zhangzilongc/MMR checkout")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    for path, marker in ((args.aprilgan, "test.py"), (args.mmr, "utils/common.py")):
        if not (path / marker).is_file():
            sys.exit(f"{path}: no {marker}; give a checkout of the repository")
    april, mmr = load_aprilgan(args.aprilgan), load_mmr(args.mmr)
    rngs = [np.random.default_rng(s) for s in range(args.seeds)]
    random = [draw(r, args.images, args.size) for r in rngs]
    wide = [(m * np.float32(250) + np.float32(300), k) for m, k in random]
    size = args.size
    half = np.zeros((2, size, size), dtype=int)
    half[0, size // 4:size // 2, size // 4:size // 2] = 1
    full = np.ones((1, size, size), dtype=int)
    cases = [
        ("random, float64", [(m.astype(np.float64), k) for m, k in random]),
        ("random, float32", random),
        ("wide (range about 1e3)", wide),
        ("constant map", [(np.full(half.shape, 0.5, np.float32), half)]),
        ("map = mask (perfect separation)", [(half.astype(np.float32), half)]),
        ("mask covers the image", [(draw(rngs[0], 1, size)[0], full)]),
    ]
    revisions = "; ".join(f"{n} {_revision(p)}" for n, p in (("VAND-APRIL-GAN", args.aprilgan),
                                                             ("MMR", args.mmr)))
    text = report(compare(cases, april, mmr), args, revisions)
    print(text)
    if args.out:
        args.out.write_text(text)


def _revision(path: Path) -> str:
    import subprocess

    out = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "(not a git checkout)"


if __name__ == "__main__":
    main()
