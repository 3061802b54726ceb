"""Helpers for end-to-end runs of the ``anomaly-bench`` command."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Small and fast: ResNet18 with seeded random weights on 64 px images.
FAST = ["backbone=resnet18", "backbone.pretrained=false", "resolution.size=64",
        "resolution.crop=null", "plots.max_overlays=4"]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    run_dir: Path

    def rows(self, name: str = "results.csv") -> list[dict[str, str]]:
        with (self.run_dir / name).open(newline="") as fh:
            return list(csv.DictReader(fh))

    def header(self) -> list[str]:
        with (self.run_dir / "results.csv").open(newline="") as fh:
            return next(csv.reader(fh))


def run_cli(args: list[str], run_dir: Path, *, cwd: Path | None = None, fast: bool = True,
            env: dict[str, str] | None = None, timeout: float = 300) -> Result:
    """Run ``anomaly-bench`` in a subprocess with its Hydra run dir at ``run_dir``."""
    cmd = [sys.executable, "-m", "anomaly_bench.cli", *(FAST if fast else []), *args]
    if not any(a.startswith("-m") or a == "--multirun" for a in args):
        cmd.append(f"hydra.run.dir={run_dir}")
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(cmd, cwd=cwd or run_dir.parent, capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr, run_dir)


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_mvtec(root: Path, categories=("bottle", "screw"), n_train=6, size=48,
               masks=True, seed=0) -> Path:
    """A tiny MVTec AD tree: textured normal images, bright-square defects with masks."""
    rng = np.random.default_rng(seed)
    for cat in categories:
        base = rng.integers(60, 120, (size, size, 3)).astype(np.uint8)
        for i in range(n_train):
            noise = rng.integers(0, 20, (size, size, 3)).astype(np.uint8)
            write_png(root / cat / "train" / "good" / f"{i:03d}.png", base + noise)
        for i in range(3):
            noise = rng.integers(0, 20, (size, size, 3)).astype(np.uint8)
            write_png(root / cat / "test" / "good" / f"{i:03d}.png", base + noise)
        for i in range(3):
            img = base + rng.integers(0, 20, (size, size, 3)).astype(np.uint8)
            mask = np.zeros((size, size), np.uint8)
            y, x = rng.integers(4, size - 16, 2)
            img[y : y + 12, x : x + 12] = 250
            mask[y : y + 12, x : x + 12] = 255
            write_png(root / cat / "test" / "crack" / f"{i:03d}.png", img)
            if masks:
                write_png(root / cat / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask)
    return root
