"""On-disk cache of backbone block outputs, keyed by image content.

A layer-combination sweep runs the same backbone over the same images dozens of times.
The cache stores, per preprocessed image, the output of *every* block of the stages the
extractor runs, so any later job that picks other blocks of those stages reads them
instead of recomputing. The key of an entry is a hash of the preprocessed image tensor
(so dataset, category, resolution and alignment are all part of it) under a folder keyed
by backbone architecture, weights and library versions. Entries are written to a temp
file and renamed, so concurrent jobs (local or on a cluster) never read half a file, and
two jobs writing the same entry write the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from anomaly_bench.memo import MEMO


def image_key(image: torch.Tensor) -> str:
    """SHA-1 of a preprocessed image tensor's shape, dtype and bytes."""
    t = image.detach().contiguous().cpu()
    h = hashlib.sha1(f"{tuple(t.shape)}|{t.dtype}".encode())
    h.update(memoryview(t.numpy()).cast("B"))  # the tensor's bytes, without a copy
    return h.hexdigest()


class FeatureCache:
    """Per-image safetensors files ``<root>/<backbone key>/<ab>/<image key>.safetensors``."""

    def __init__(self, root: str | Path, backbone_id: str) -> None:
        import timm

        ident = f"{backbone_id}|torch={torch.__version__}|timm={timm.__version__}"
        digest = hashlib.sha1(ident.encode()).hexdigest()[:16]
        self.dir = Path(root).expanduser() / digest
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def load(self, keys: Sequence[str], names: Sequence[str]) -> dict[str, torch.Tensor] | None:
        """Stacked tensors ``{name: (B, ...)}`` when every image has every name, else None.

        A batch read before in this process (or just stored) comes from the process memo
        (:mod:`anomaly_bench.memo`) without touching the disk.
        """
        from safetensors import safe_open

        batch = tuple(keys)
        held = {n: MEMO.get(("features", str(self.dir), batch, n)) for n in names}
        if all(v is not None for v in held.values()):
            self.hits += len(keys)
            return held
        paths = [self._path(k) for k in keys]
        if not all(p.is_file() for p in paths):
            self.misses += len(keys)
            return None
        out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for p in paths:
            try:
                with safe_open(str(p), framework="pt", device="cpu") as fh:
                    stored = set(fh.keys())
                    if not set(names) <= stored:
                        self.misses += len(keys)
                        return None
                    for n in names:
                        out[n].append(fh.get_tensor(n))
            except (OSError, RuntimeError, ValueError):  # unreadable entry: recompute it
                self.misses += len(keys)
                return None
        self.hits += len(keys)
        stacked = {n: torch.stack(v) for n, v in out.items()}
        self._remember(batch, stacked)
        return stacked

    def store(self, keys: Sequence[str], blocks: dict[str, torch.Tensor]) -> None:
        """Write one entry per image holding every block output given (B, ...) each."""
        from safetensors.torch import save_file

        cpu = {n: t.detach().float().cpu() for n, t in blocks.items()}
        for i, key in enumerate(keys):
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
            os.close(fd)
            try:
                save_file({n: t[i].contiguous() for n, t in cpu.items()}, tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        self._remember(tuple(keys), cpu)

    def _remember(self, batch: tuple[str, ...], stacked: dict[str, torch.Tensor]) -> None:
        for n, t in stacked.items():
            MEMO.put(("features", str(self.dir), batch, n), t)
