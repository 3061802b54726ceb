"""Helpers for end-to-end runs of the ``anomaly-bench`` command."""

from __future__ import annotations

import csv
import json
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


# Loaded through ``sitecustomize`` into a CLI subprocess: every host lookup and TCP
# connection attempt is appended to a log, and every connection times out at once
# (a network that drops packets, the case a hub probe has to bound).
_NETWORK_RECORDER = """
import json, os, socket

_log = os.environ["ANOMALY_BENCH_TEST_NETWORK_LOG"]
_connect, _getaddrinfo = socket.socket.connect, socket.getaddrinfo


def _record(**event):
    with open(_log, "a") as fh:
        fh.write(json.dumps(event) + "\\n")


def getaddrinfo(host, port, *args, **kwargs):
    _record(event="resolve", host=host, port=port)
    return _getaddrinfo(host, port, *args, **kwargs)


def connect(sock, address):
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return _connect(sock, address)
    _record(event="connect", host=address[0], port=address[1], timeout=sock.gettimeout())
    raise TimeoutError("timed out (network black-holed by the test)")


socket.getaddrinfo = getaddrinfo
socket.socket.connect = connect
"""


def black_hole_network(folder: Path) -> tuple[dict[str, str], Path]:
    """(env for :func:`run_cli`, log path): the run's network attempts are logged and time out.

    The log holds one JSON object per line: ``{"event": "resolve", "host", "port"}`` or
    ``{"event": "connect", "host", "port", "timeout"}`` (the socket's time-out in seconds).
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_NETWORK_RECORDER)
    log = folder / "network.jsonl"
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "ANOMALY_BENCH_TEST_NETWORK_LOG": str(log)}, log


def network_events(log: Path) -> list[dict]:
    """The events :func:`black_hole_network` logged, in order (none when the file is absent)."""
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line]


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


def tiny_clip_env(folder: Path) -> tuple[dict[str, str], list[str]]:
    """(env for :func:`run_cli`, overrides): the run's open_clip knows the tiny test model
    (``tests/fixtures.py``: 3 blocks, 64 px) through a ``sitecustomize`` that registers it,
    and the overrides select it with seeded random weights."""
    from fixtures import register_tiny_clip

    name = register_tiny_clip(folder)
    (folder / "sitecustomize.py").write_text(
        f"import open_clip\nopen_clip.add_model_config({str(folder)!r})\n")
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path}, [f"backbone.name={name}", "backbone.hub_tag=null",
                                  "backbone.pretrained=false", "backbone.image_size=64"]
