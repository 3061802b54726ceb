"""On-disk cache of backbone block outputs, keyed by image content.

A layer-combination sweep runs the same backbone over the same images dozens of times.
The cache stores, per preprocessed image, the output of *every* block of the stages the
extractor runs, so any later job that picks other blocks of those stages reads them
instead of recomputing. The key of an entry is a hash of the preprocessed image tensor
(so dataset, category, resolution and alignment are all part of it) under a folder keyed
by backbone architecture, weights and library versions.

An entry is a safetensors file whose metadata records the format version and, per
tensor, its shape, dtype and a BLAKE2b checksum of its bytes. Every entry read from disk
is checked against that record, against the shapes the caller expects and against the
other entries of its batch; an entry that fails (unreadable, truncated, of another
format, of another shape, with damaged bytes) is removed with a warning and its batch is
recomputed and stored again. Entries are written through
:func:`anomaly_bench.fsutil.atomic_write_bytes`, so concurrent jobs (local or on a
cluster) never read half a file, and two jobs writing the same entry write the same
bytes. Files are written by a background thread while the backbone goes on; a batch just
computed or verified is served from the process memo.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from anomaly_bench.fsutil import atomic_write_bytes
from anomaly_bench.memo import MEMO

log = logging.getLogger("anomaly_bench")

#: Metadata key of an entry's record (one key: safetensors writes several in any order).
RECORD_KEY = "anomaly_bench.features"
#: Version of the entry format; entries of any other version are discarded on load.
FORMAT_VERSION = 2
#: dtype of every stored block output
DTYPE = torch.float32

#: A shape a tensor must have; None in a dimension leaves that dimension unchecked.
Shape = tuple[int | None, ...]


def image_key(image: torch.Tensor) -> str:
    """SHA-1 of a preprocessed image tensor's shape, dtype and bytes."""
    t = image.detach().contiguous().cpu()
    h = hashlib.sha1(f"{tuple(t.shape)}|{t.dtype}".encode())
    h.update(memoryview(t.numpy()).cast("B"))  # the tensor's bytes, without a copy
    return h.hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    """BLAKE2b-128 of a tensor's bytes in C order, read in place when contiguous."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def entry_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The safetensors bytes of one entry: ``tensors`` and the record of each one's shape,
    dtype and checksum, with the format version."""
    from safetensors.torch import save

    record = {"version": FORMAT_VERSION,
              "tensors": {n: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype),
                              "blake2b": tensor_digest(t)} for n, t in tensors.items()}}
    return save(dict(tensors),
                metadata={RECORD_KEY: json.dumps(record, sort_keys=True, separators=(",", ":"))})


class BadEntry(Exception):
    """A cache entry that must not be used; the message says what is wrong with it."""


def _fits(shape: tuple[int, ...], want: Shape | None) -> bool:
    return want is None or (len(shape) == len(want)
                            and all(w is None or w == s for s, w in zip(shape, want, strict=True)))


def read_entry(path: str | Path, names: Sequence[str],
               want: Mapping[str, Shape | None] | None = None) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of the entry at ``path``, each checked against the entry's record.

    ``want[name]`` is the stored (h, w, C) shape the tensor must have (None in a dimension
    leaves it unchecked). Raises :class:`BadEntry` naming what is wrong when the file is
    unreadable or of another format, a name is missing, a tensor's shape or dtype differs
    from its record or from ``want``, or its bytes do not match their checksum; raises
    :class:`FileNotFoundError` when the file is gone.
    """
    from safetensors import SafetensorError, safe_open

    want = want or {}
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            raw = (fh.metadata() or {}).get(RECORD_KEY)
            if raw is None:
                raise BadEntry(f"no format record (entry format older than version "
                               f"{FORMAT_VERSION})")
            try:
                record = json.loads(raw)
                version, recorded = record["version"], record["tensors"]
                if not isinstance(recorded, dict):
                    raise TypeError("no tensor records")
            except (ValueError, TypeError, KeyError) as exc:
                raise BadEntry(f"unreadable format record ({exc})") from exc
            if version != FORMAT_VERSION:
                raise BadEntry(f"format version {version}, expected {FORMAT_VERSION}")
            stored = set(fh.keys())
            missing = [n for n in names if n not in stored or n not in recorded]
            if missing:
                raise BadEntry(f"missing {', '.join(missing)}")
            for n in names:
                t = fh.get_tensor(n)
                rec = recorded[n] if isinstance(recorded[n], dict) else {}
                shape, dtype = tuple(t.shape), _dtype_name(t.dtype)
                if [*shape] != rec.get("shape") or dtype != rec.get("dtype"):
                    raise BadEntry(f"{n} is {dtype} {shape}, its record says "
                                   f"{rec.get('dtype')} {rec.get('shape')}")
                if t.dtype != DTYPE:
                    raise BadEntry(f"{n} is {dtype}, expected {_dtype_name(DTYPE)}")
                if not _fits(shape, want.get(n)):
                    raise BadEntry(f"{n} has (h, w, C) shape {shape}, expected {want[n]}")
                if tensor_digest(t) != rec.get("blake2b"):
                    raise BadEntry(f"the bytes of {n} do not match their checksum")
                out[n] = t
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as exc:
        raise BadEntry(f"unreadable ({type(exc).__name__}: {exc})") from exc
    return out


def _discard(path: Path, seen: os.stat_result) -> None:
    """Remove ``path`` unless another job has replaced it since it was read."""
    try:
        now = path.stat()
        if (now.st_dev, now.st_ino) == (seen.st_dev, seen.st_ino):
            path.unlink()
    except OSError:
        pass


class FeatureCache:
    """Per-image safetensors files ``<root>/<backbone key>/<ab>/<image key>.safetensors``.

    Each holds every block output of one image as an (h, w, C) float32 tensor (the
    channels-last layout the extractor returns), so reading back needs no transposition.
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

    def load(self, keys: Sequence[str], names: Sequence[str],
             shapes: Mapping[str, Shape] | None = None) -> dict[str, torch.Tensor] | None:
        """Stacked tensors ``{name: (B, C, h, w)}`` when every image has a valid entry with
        every name, else None (the caller recomputes the batch and stores it again).

        ``shapes[name]`` is the (C, h, w) each image's tensor must have (None in a
        dimension leaves it unchecked); the entries of a batch must also agree.
        Every entry read from disk is verified (:func:`read_entry`); one that fails is
        removed with a warning naming the file and the fault. A batch read before in this
        process (or just stored) comes from the process memo (:mod:`anomaly_bench.memo`)
        without touching the disk.
        """
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
        # stored layout is (h, w, C); after the first entry the batch must match it
        want: dict[str, Shape | None] = {n: None for n in names}
        for n, (c, h, w) in (shapes or {}).items():
            if n in want:
                want[n] = (h, w, c)
        out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for p in paths:
            try:
                seen = p.stat()
                tensors = read_entry(p, names, want)
            except BadEntry as bad:
                log.warning("feature cache: discarding %s: %s; recomputing its batch", p, bad)
                _discard(p, seen)
                self.misses += len(keys)
                return None
            except OSError:  # removed by another job meanwhile: recompute
                self.misses += len(keys)
                return None
            for n, t in tensors.items():
                out[n].append(t)
                want[n] = tuple(t.shape)
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
        cpu = {n: t.detach().to(DTYPE).cpu() for n, t in blocks.items()}
        self._remember(tuple(keys), cpu)
        _PENDING.append(_writer().submit(self._write, list(keys), cpu))

    def _write(self, keys: list[str], cpu: dict[str, torch.Tensor]) -> None:
        for i, key in enumerate(keys):
            path = self._path(key)
            data = entry_bytes({n: t[i].permute(1, 2, 0).contiguous() for n, t in cpu.items()})
            try:
                atomic_write_bytes(path, data, durable=False)
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
