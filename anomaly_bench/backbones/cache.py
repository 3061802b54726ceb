"""On-disk cache of backbone block outputs, keyed by image content.

A layer-combination sweep runs the same backbone over the same images dozens of times.
The cache stores, per preprocessed image, the output of *every* block of the stages the
extractor runs, so any later job that picks other blocks of those stages reads them
instead of recomputing. The key of an entry is a hash of the preprocessed image tensor
(so dataset, category, resolution and alignment are all part of it) under a folder keyed
by backbone architecture, weights and library versions. Entries are written to a temp
file and renamed, so concurrent jobs (local or on a cluster) never read half a file, and
two jobs writing the same entry write the same bytes. Files are written by a background
thread while the backbone goes on; a batch just computed is served from the process memo.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from anomaly_bench.memo import MEMO

log = logging.getLogger("anomaly_bench")


def image_key(image: torch.Tensor) -> str:
    """SHA-1 of a preprocessed image tensor's shape, dtype and bytes."""
    t = image.detach().contiguous().cpu()
    h = hashlib.sha1(f"{tuple(t.shape)}|{t.dtype}".encode())
    h.update(memoryview(t.numpy()).cast("B"))  # the tensor's bytes, without a copy
    return h.hexdigest()


class FeatureCache:
    """Per-image safetensors files ``<root>/<backbone key>/<ab>/<image key>.safetensors``.

    Each holds every block output of one image as an (h, w, C) tensor (the channels-last
    layout the extractor returns), so reading back needs no transposition.
    """

    def __init__(self, root: str | Path, backbone_id: str) -> None:
        import timm

        ident = f"{backbone_id}|torch={torch.__version__}|timm={timm.__version__}|hwc"
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
        flush_writes()  # entries still being written count as stored
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
                        out[n].append(fh.get_tensor(n))  # (h, w, C)
            except (OSError, RuntimeError, ValueError):  # unreadable entry: recompute it
                self.misses += len(keys)
                return None
        self.hits += len(keys)
        # (B, h, w, C) storage seen as (B, C, h, w) in the channels-last format
        stacked = {n: torch.stack(v).permute(0, 3, 1, 2) for n, v in out.items()}
        self._remember(batch, stacked)
        return stacked

    def store(self, keys: Sequence[str], blocks: dict[str, torch.Tensor]) -> None:
        """Write one entry per image holding every block output given (B, ...) each.

        The batch is served from the process memo at once; the files are written by a
        background thread while the caller computes on (:func:`flush_writes` waits).
        """
        cpu = {n: t.detach().float().cpu() for n, t in blocks.items()}
        self._remember(tuple(keys), cpu)
        _PENDING.append(_writer().submit(self._write, list(keys), cpu))

    def _write(self, keys: list[str], cpu: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        for i, key in enumerate(keys):
            path = self._path(key)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-",
                                           suffix=".safetensors")
                os.close(fd)
                try:
                    save_file({n: t[i].permute(1, 2, 0).contiguous() for n, t in cpu.items()},
                              tmp)
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            except OSError as exc:  # the cache only saves time: report it, go on without
                log.warning("feature cache: cannot write %s (%s); later runs will recompute "
                            "these block outputs (backbone.cache.dir=%s)", path, exc, self.dir)
                return

    def _remember(self, batch: tuple[str, ...], stacked: dict[str, torch.Tensor]) -> None:
        for n, t in stacked.items():
            MEMO.put(("features", str(self.dir), batch, n), t)


_EXECUTOR: ThreadPoolExecutor | None = None
_PENDING: list[Future] = []


def _writer() -> ThreadPoolExecutor:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feature-cache")
        atexit.register(flush_writes)
    return _EXECUTOR


def flush_writes() -> None:
    """Wait until every cache entry stored so far is on disk."""
    while _PENDING:
        _PENDING.pop(0).result()
