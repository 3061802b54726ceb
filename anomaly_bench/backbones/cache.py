"""On-disk cache of backbone block outputs, keyed by image content.

A layer-combination sweep runs the same backbone over the same images dozens of times.
The cache stores, per preprocessed image, the output of *every* block of the stages the
extractor runs, so any later job that picks other blocks of those stages reads them
instead of recomputing. The key of an entry is a hash of the preprocessed image tensor
(so dataset, category, resolution and alignment are all part of it) under a folder keyed
by backbone architecture, weights and library versions. An entry holds float32 values:
at 224 px (layer1-3) 20.9 MB per image for WideResNet50-2 and ResNet50 (13 blocks),
34.5 MB for WideResNet101-2 (30 blocks), 2.8 MB for ResNet18 (:func:`entry_size` gives
the figure for other grids).

An entry is a safetensors file whose metadata records the format version and, per
tensor, its shape, dtype and an XXH3-128 checksum of its bytes. Every entry read from disk
is checked against that record, against the shapes the caller expects and against the
other entries of its batch; an entry that fails (unreadable, truncated, of another
format, of another shape, with damaged bytes) is removed with a warning and its batch is
recomputed and stored again. Entries are written through
:func:`anomaly_bench.fsutil.atomic_open`, so concurrent jobs (local or on a cluster)
never read half a file, and two jobs writing the same entry write the same bytes.

Where a batch comes from, in order: the process memo (:mod:`anomaly_bench.memo`), the
entries still queued for writing (a background thread writes them while the backbone goes
on; at most :data:`MAX_QUEUED_BATCHES` batches wait, so their memory stays bounded), the
files, and only then the backbone. A job whose memo entries were evicted (a small
``memory_cache_gb``, or a host short of memory) therefore reads the files; it never waits
for the writer, and it runs the backbone only for images found nowhere, which the log
says (:data:`STATS` counts the images of each source).

Size: ``backbone.cache.max_gb`` caps the folder; after each written batch, when the
folder has grown past the cap, the least recently used entries are removed (recency is
the later of a file's access and modification time; reading an entry refreshes it).
Entries vanishing under a job (removed by another job, or by ``--clear``) only make it
recompute that batch. ``python -m anomaly_bench.cache_cli [DIR]`` (console script
``anomaly-bench-cache``) shows a cache folder's size; ``--clear`` empties it and
``--max-gb N`` trims it. When the host is short of memory, each entry written is handed
to the kernel for writeback at once and dropped from the page cache.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from anomaly_bench.fsutil import atomic_open
from anomaly_bench.memo import MEMO

log = logging.getLogger("anomaly_bench")

#: Metadata key of an entry's record (one key: safetensors writes several in any order).
RECORD_KEY = "anomaly_bench.features"
#: Version of the entry format; entries of any other version are discarded on load.
FORMAT_VERSION = 3
#: dtype of every stored block output
DTYPE = torch.float32

#: A shape a tensor must have; None in a dimension leaves that dimension unchecked.
Shape = tuple[int | None, ...]


def tensor_digest(t: torch.Tensor) -> str:
    """XXH3-128 of a tensor's bytes in C order, read in place when contiguous.

    The checksum catches damaged bytes (a truncated, torn or bit-flipped file); it is no
    seal, since the record sits in the same file. XXH3 hashes at about 17 GB/s on one
    core where BLAKE2b takes 1 GB/s: the 1.2 GB a PaDiM sweep's first job stores cost the
    writer 1.2 s of a core with BLAKE2b, and every entry read is hashed again."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return xxhash.xxh3_128_hexdigest(raw)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


#: Writes of one entry whose folder a concurrent clear keeps removing, before giving up.
_WRITE_ATTEMPTS = 20

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
                if tensor_digest(t) != rec.get("xxh3_128"):
                    raise BadEntry(f"the bytes of {n} do not match their checksum")
                out[n] = t
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as exc:
        raise BadEntry(f"unreadable ({type(exc).__name__}: {exc})") from exc
    return out


#: Batches whose entries may wait for the writer at once; a further store waits.
MAX_QUEUED_BATCHES = 2
#: After the cap is exceeded, entries are removed down to this fraction of it.
TRIM_TO = 0.9
#: A process refreshes the recency of an entry it keeps using at most this often (s).
TOUCH_EVERY_S = 300.0
#: Entries this process wrote or read within this many seconds count as in use.
IN_USE_S = 600
#: Temp files older than this (s) are left over by a stopped writer and may be removed.
STALE_TMP_S = 3600.0
#: Temp files younger than this (s) may belong to a running writer: clearing keeps them.
BUSY_TMP_S = 60.0
GIB = 2**30

_ENTRY = re.compile(r"[0-9a-f]{40}\.safetensors")
_TMP = re.compile(r"\.[0-9a-f]{40}\.safetensors\..*\.tmp")
_BACKBONE_DIR = re.compile(r"[0-9a-f]{16}")
_SHARD_DIR = re.compile(r"[0-9a-f]{2}")


#: The channels of a block a reader keeps: (sorted channel indices on the CPU, a digest
#: of them that names the subset in memo keys).
Kept = tuple[torch.Tensor, str]


def kept_channels(index: torch.Tensor) -> Kept:
    """The :data:`Kept` of sorted channel indices (a 1-d integer tensor)."""
    index = index.detach().to("cpu", torch.int64).contiguous()
    return index, hashlib.sha1(index.numpy().tobytes()).hexdigest()[:16]


def select_last(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Entries ``index`` of the last dimension of a (..., C) tensor, as a new tensor.

    Selected as columns of the (n, C) matrix ``t`` is: ``index_select`` along the last
    dimension of a 4-d tensor takes 3-5 times as long on the CPU.
    """
    rows = t.reshape(-1, t.shape[-1])  # a view when the last dimension is the densest
    return rows.index_select(1, index).view(*t.shape[:-1], -1)


def select_channels(block: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Channels ``index`` of a (B, C, h, w) block, kept in the channels-last layout."""
    return select_last(block.permute(0, 2, 3, 1), index).permute(0, 3, 1, 2)


def entry_size(blocks: Mapping[str, Sequence[int]]) -> int:
    """Bytes of the tensors of one entry holding blocks of the given (C, h, w) shapes."""
    return sum(4 * c * h * w for c, h, w in blocks.values())


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
                       torch.uint8: "U8"}


def _header(tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, list[str]]:
    """The safetensors header of an entry (length prefix included) and the tensor order."""
    record = {"version": FORMAT_VERSION,
              "tensors": {n: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype),
                              "xxh3_128": tensor_digest(t)} for n, t in tensors.items()}}
    order = sorted(tensors)
    head: dict = {"__metadata__": {
        RECORD_KEY: json.dumps(record, sort_keys=True, separators=(",", ":"))}}
    offset = 0
    for n in order:
        t = tensors[n]
        size = t.numel() * t.element_size()
        head[n] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                   "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data on 8 bytes
    return struct.pack("<Q", len(raw)) + raw, order


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def entry_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The safetensors bytes of one entry: ``tensors`` and the record of each
    one's shape, dtype and checksum, with the format version."""
    head, order = _header(tensors)
    return b"".join([head, *(_tensor_bytes(tensors[n]).tobytes() for n in order)])


def write_entry(path: Path, tensors: Mapping[str, torch.Tensor],
                release: bool = False) -> int:
    """Write the entry :func:`entry_bytes` describes to ``path`` atomically, straight from
    the tensors' memory; return its size in bytes.

    ``release`` starts writing the file back to disk at once (without waiting for it), so
    that :func:`drop_cached` can soon drop it from the page cache."""
    head, order = _header(tensors)
    size = len(head)
    with atomic_open(path, "wb", durable=False) as fh:
        fh.write(head)
        for n in order:
            data = _tensor_bytes(tensors[n])
            fh.write(data)
            size += data.nbytes
        if release and hasattr(os, "posix_fadvise"):
            fh.flush()
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return size


def drop_cached(paths: Sequence[Path]) -> None:
    """Drop the files' pages that are on disk from the page cache (Linux; best effort).

    The writer releases an entry its process keeps in the memo, or every entry when
    memory is short: a second copy of the same bytes would otherwise stay in memory,
    charged to the job's cgroup (a SLURM job's ``--mem``), and each new page of it takes
    a fresh page of the host's memory (measured on a virtual machine whose host backs
    fresh pages slowly: a new 1 GiB file took 16 s of system time to write, and 1.8 s
    when the pages of each written part were dropped and reused for the next). The
    pages of a batch are dropped when the next batch is written: by then the writeback
    :func:`write_entry` started is done, and nothing waits for the disk. Other processes
    read the files from disk once."""
    if not hasattr(os, "posix_fadvise"):
        return
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:  # removed meanwhile
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _memory_short() -> bool:
    """True when the host has less than twice the memo's reserve available."""
    from anomaly_bench.memo import host_available, host_reserve

    available = host_available()
    return available is not None and available < 2 * host_reserve()


def _discard(path: Path, seen: os.stat_result) -> None:
    """Remove ``path`` unless another job has replaced it since it was read."""
    try:
        now = path.stat()
        if (now.st_dev, now.st_ino) == (seen.st_dev, seen.st_ino):
            path.unlink()
    except OSError:
        pass


@dataclass
class CacheStats:
    """Images served per source since the last :func:`reset_stats`, and the cache folders
    (roots) used."""

    memory: int = 0
    disk: int = 0
    computed: int = 0
    roots: set[str] = field(default_factory=set)

    @property
    def used(self) -> bool:
        return bool(self.memory or self.disk or self.computed)

    def describe(self) -> str:
        """One sentence for the log, e.g. ``64 images from memory, 0 from disk, 0 through
        the backbone``."""
        text = (f"{self.memory} images from memory, {self.disk} from disk, "
                f"{self.computed} through the backbone")
        if self.computed:
            text += " (in neither memory nor the cache folder)"
        return text


#: Process-wide counters, reset at the start of each job (report/callbacks.py).
STATS = CacheStats()


def reset_stats() -> CacheStats:
    """Start counting anew; return the counts so far."""
    global STATS
    old, STATS = STATS, CacheStats()
    return old


#: Size cap in bytes per cache root (absolute path), set from ``backbone.cache.max_gb``.
_MAX_BYTES: dict[str, int | None] = {}


def _root_key(root: str | os.PathLike) -> str:
    return os.path.abspath(os.path.expanduser(root))


def set_max_gb(root: str | os.PathLike, max_gb: float | None) -> None:
    """Cap the folder ``root`` at ``max_gb`` GiB (None: no cap) for caches opened on it
    without a cap of their own."""
    _MAX_BYTES[_root_key(root)] = None if max_gb is None else int(float(max_gb) * GIB)


class FeatureCache:
    """Per-image safetensors files ``<root>/<backbone key>/<ab>/<image key>.safetensors``.

    Each holds every block output of one image as an (h, w, C) float32 tensor (the
    channels-last layout the extractor returns), so reading back needs no transposition.
    ``max_gb`` caps the size of ``root`` (default: the cap :func:`set_max_gb` set for
    it, else none).
    """

    def __init__(self, root: str | Path, backbone_id: str, max_gb: float | None = None
                 ) -> None:
        import timm

        ident = f"{backbone_id}|torch={torch.__version__}|timm={timm.__version__}|hwc"
        digest = hashlib.sha1(ident.encode()).hexdigest()[:16]
        self.root = Path(root).expanduser()
        self.dir = self.root / digest
        self.max_bytes = (int(max_gb * GIB) if max_gb is not None
                          else _MAX_BYTES.get(_root_key(self.root)))
        self.hits = 0
        self.misses = 0
        self._told = False

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def load(self, keys: Sequence[str], names: Sequence[str],
             shapes: Mapping[str, Shape] | None = None,
             kept: Mapping[str, Kept] | None = None) -> dict[str, torch.Tensor] | None:
        """Stacked tensors ``{name: (B, C, h, w)}`` when every image has a valid entry with
        every name, else None (the caller recomputes the batch and stores it again).

        ``shapes[name]`` is the (C, h, w) each image's tensor must have (None in a
        dimension leaves it unchecked); the entries of a batch must also agree.
        ``kept[name]``: only these channels of that tensor are wanted (the memo holds
        them apart from other subsets; entries on disk hold whole blocks).
        A batch read before in this process (or just stored) comes from the process memo
        without touching the disk; an image whose entry is still queued for writing comes
        from the writer's queue. Every entry read from disk is verified
        (:func:`read_entry`); one that fails is removed with a warning naming the file and
        the fault. An entry that vanishes meanwhile (removed by another job) only makes
        the batch a miss.
        """
        batch = tuple(keys)
        STATS.roots.add(_root_key(self.root))
        paths = [self._path(k) for k in keys]
        kept = kept or {}
        held = {n: MEMO.get(self._memo_key(batch, n, kept.get(n))) for n in names}
        if all(v is not None for v in held.values()):
            self.hits += len(keys)
            STATS.memory += len(keys)
            _touch(paths)
            return held
        # stored layout is (h, w, C); after the first entry the batch must match it
        want: dict[str, Shape | None] = {n: None for n in names}
        for n, (c, h, w) in (shapes or {}).items():
            if n in want:
                want[n] = (h, w, c)
        out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        queued = 0
        for p in paths:
            tensors = _queued(p, names)
            if tensors is not None:
                queued += 1
            else:
                try:
                    seen = p.stat()
                    tensors = read_entry(p, names, want)
                except BadEntry as bad:
                    log.warning("feature cache: discarding %s: %s; recomputing its batch",
                                p, bad)
                    _discard(p, seen)
                    return self._miss(len(keys), f"{p} was damaged")
                except OSError:  # absent, or removed by another job meanwhile
                    return self._miss(len(keys), f"not in memory nor in {self.dir}")
            for n, t in tensors.items():
                # the kept channels of each image: the whole blocks are never stacked
                out[n].append(select_last(t, kept[n][0]) if n in kept else t)
                want[n] = tuple(t.shape)
        self.hits += len(keys)
        STATS.memory += queued
        STATS.disk += len(keys) - queued
        _touch(paths, force=True)
        # (B, h, w, C) storage seen as (B, C, h, w) in the channels-last format
        stacked = {n: torch.stack(v).permute(0, 3, 1, 2) for n, v in out.items()}
        self._remember(batch, stacked, kept)
        return stacked

    def _miss(self, n: int, why: str) -> None:
        self.misses += n
        STATS.computed += n
        # the first miss of a job is worth a line; the job's totals follow at its end
        (log.debug if self._told else log.info)(
            "feature cache: running the backbone on a batch of %d images (%s)", n, why)
        self._told = True
        return None

    def store(self, keys: Sequence[str], blocks: dict[str, torch.Tensor],
              kept: Mapping[str, Kept] | None = None) -> dict[str, torch.Tensor]:
        """Write one entry per image holding every block output given (B, ...) each, and
        return the blocks as :meth:`load` gives them (``kept`` as there).

        The batch is served from the process memo (the ``kept`` channels of those blocks,
        the others whole) and the writer's queue at once; the files are written by a
        background thread while the caller computes on (:func:`flush_writes` waits).
        With :data:`MAX_QUEUED_BATCHES` batches queued, this waits for the oldest.
        """
        kept = kept or {}
        cpu = {n: t.detach().to(DTYPE).cpu() for n, t in blocks.items()}
        held = _kept(cpu, kept)
        in_memo = self._remember(tuple(keys), held, kept)
        paths = [self._path(k) for k in keys]
        with _LOCK:
            for i, p in enumerate(paths):
                _QUEUED[p] = (cpu, i)
        _submit(self._write, paths, cpu, in_memo)
        return held

    def _write(self, paths: list[Path], cpu: dict[str, torch.Tensor], in_memo: bool) -> None:
        written = 0
        release = in_memo or _memory_short()
        _drop_released()
        try:
            for i, path in enumerate(paths):
                tensors = {n: t[i].permute(1, 2, 0) for n, t in cpu.items()}
                try:
                    for attempt in range(_WRITE_ATTEMPTS):
                        try:
                            written += write_entry(path, tensors, release=release)
                            break
                        except OSError as exc:  # ENOENT: its folder was removed meanwhile
                            if exc.errno != errno.ENOENT or attempt == _WRITE_ATTEMPTS - 1:
                                raise
                except (OSError, MemoryError) as exc:  # the cache only saves time
                    log.warning("feature cache: cannot write %s (%s); later runs will "
                                "recompute these block outputs (backbone.cache.dir=%s)",
                                path, exc, self.root)
                    return
                finally:
                    _unqueue(path, cpu)
        finally:
            for path in paths:
                _unqueue(path, cpu)
            if release:
                _RELEASED.extend(paths)
            if written:
                _USED.update(dict.fromkeys(map(str, paths), time.monotonic()))
                self._keep_under_cap(written)

    def _keep_under_cap(self, written: int) -> None:
        """Remove least recently used entries once ``root`` has grown past the cap."""
        global _warned_cap
        if self.max_bytes is None:
            return
        key = _root_key(self.root)
        size = _SIZE.get(key)
        size = folder_size(self.root) if size is None else size + written
        if size > self.max_bytes:
            removed = trim(self.root, int(self.max_bytes * TRIM_TO))
            size = removed.kept_bytes
            if removed.in_use and not _warned_cap:
                _warned_cap = True
                log.warning("feature cache: backbone.cache.max_gb=%g removes entries this "
                            "process used in the last %d minutes (%d so far): the cap is "
                            "smaller than what this run reuses, so it recomputes them; raise "
                            "the cap to read them instead", self.max_bytes / GIB,
                            IN_USE_S // 60, removed.in_use)
            if removed.entries:
                log.info("feature cache: removed the %d least recently used entries "
                         "(%s) to keep %s under backbone.cache.max_gb=%g",
                         removed.entries, human(removed.bytes), self.root,
                         self.max_bytes / GIB)
        _SIZE[key] = size

    def _memo_key(self, batch: tuple[str, ...], name: str, kept: Kept | None) -> tuple:
        return ("features", str(self.dir), batch, name, None if kept is None else kept[1])

    def _remember(self, batch: tuple[str, ...], stacked: dict[str, torch.Tensor],
                  kept: Mapping[str, Kept]) -> bool:
        """Keep a batch's blocks (the ``kept`` channels of those named there) in the
        memo; True when it kept them all."""
        # the files (or the writer's queue) hold them too: the memo drops them first; a
        # list, not a generator: every block is offered, also after one was declined
        return all([MEMO.put(self._memo_key(batch, n, kept.get(n)), t, spill=True)
                    for n, t in stacked.items()])


def _kept(blocks: Mapping[str, torch.Tensor], kept: Mapping[str, Kept]
          ) -> dict[str, torch.Tensor]:
    """The blocks with only the ``kept`` channels of those named there."""
    return {n: select_channels(t, kept[n][0]) if n in kept else t for n, t in blocks.items()}


_EXECUTOR: ThreadPoolExecutor | None = None
_LOCK = threading.Lock()
#: Entries waiting for the writer: path -> (the batch's (B, C, h, w) blocks, index).
_QUEUED: dict[Path, tuple[dict[str, torch.Tensor], int]] = {}
_PENDING: deque[Future] = deque()
#: Entries written with ``release``, to drop from the page cache (:func:`drop_cached`).
_RELEASED: deque[Path] = deque()
#: Size in bytes of each cache root as last scanned, plus what this process wrote since.
_SIZE: dict[str, int] = {}
#: Entries this process wrote or read, with when (``time.monotonic``).
_USED: dict[str, float] = {}
_warned_cap = False


def _queued(path: Path, names: Sequence[str]) -> dict[str, torch.Tensor] | None:
    """The (h, w, C) tensors ``names`` of an entry still waiting for the writer, or None."""
    with _LOCK:
        item = _QUEUED.get(path)
    if item is None:
        return None
    blocks, i = item
    if not all(n in blocks for n in names):
        return None
    return {n: blocks[n][i].permute(1, 2, 0) for n in names}


def _unqueue(path: Path, cpu: dict[str, torch.Tensor]) -> None:
    with _LOCK:
        item = _QUEUED.get(path)
        if item is not None and item[0] is cpu:
            del _QUEUED[path]


def _touch(paths: Sequence[Path], force: bool = False) -> None:
    """Mark entries as used now (their modification time), for least-recently-used
    removal; entries read from memory are refreshed at most every TOUCH_EVERY_S."""
    now = time.monotonic()
    for p in paths:
        key = str(p)
        if not force and now - _USED.get(key, -TOUCH_EVERY_S) < TOUCH_EVERY_S:
            continue
        _USED[key] = now
        try:
            os.utime(p)
        except OSError:  # still queued, or removed meanwhile
            pass


def _writer() -> ThreadPoolExecutor:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feature-cache")
        atexit.register(flush_writes)
    return _EXECUTOR


def _submit(fn, *args) -> None:
    while _PENDING and _PENDING[0].done():
        _PENDING.popleft().result()
    while len(_PENDING) >= MAX_QUEUED_BATCHES:
        _PENDING.popleft().result()
    _PENDING.append(_writer().submit(fn, *args))


def _drop_released() -> None:
    paths = []
    while _RELEASED:
        paths.append(_RELEASED.popleft())
    drop_cached(paths)


def flush_writes() -> None:
    """Wait until every cache entry stored so far is written (to the page cache), and
    drop the released ones whose writeback is done."""
    while _PENDING:
        _PENDING.popleft().result()
    _drop_released()


# --- the folder: size, least-recently-used removal, clearing ----------------------------

@dataclass
class Entry:
    path: Path
    size: int
    used: float  # the later of access and modification time
    temp: bool = False


def entries(root: str | os.PathLike) -> Iterator[Entry]:
    """The entry files (and writers' temp files) under a cache root. Only files named as
    the cache names them, two folders down, are listed; files vanishing meanwhile are
    skipped."""
    root = Path(root).expanduser()
    for top in _subdirs(root, _BACKBONE_DIR):
        for shard in _subdirs(top, _SHARD_DIR):
            try:
                listing = list(os.scandir(shard))
            except OSError:
                continue
            for item in listing:
                temp = bool(_TMP.fullmatch(item.name))
                if not (temp or _ENTRY.fullmatch(item.name)):
                    continue
                try:
                    st = item.stat(follow_symlinks=False)
                except OSError:
                    continue
                if item.is_file(follow_symlinks=False):
                    yield Entry(Path(item.path), st.st_size, max(st.st_atime, st.st_mtime),
                                temp)


def _subdirs(folder: Path, name: re.Pattern) -> list[Path]:
    try:
        return [Path(d.path) for d in os.scandir(folder)
                if name.fullmatch(d.name) and d.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def folder_size(root: str | os.PathLike) -> int:
    """Bytes held by the entries under a cache root."""
    return sum(e.size for e in entries(root))


@dataclass
class Removed:
    entries: int = 0
    bytes: int = 0
    temp_files: int = 0
    kept_entries: int = 0
    kept_bytes: int = 0
    in_use: int = 0  # removed entries this process wrote or read in the last IN_USE_S


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except OSError:  # removed by another job meanwhile, or not ours to remove
        return False


def trim(root: str | os.PathLike, max_bytes: int) -> Removed:
    """Remove the least recently used entries under ``root`` until at most ``max_bytes``
    remain, and writers' temp files older than STALE_TMP_S."""
    out = Removed()
    now, now_used = time.time(), time.monotonic()
    kept = []
    for e in entries(root):
        if e.temp:
            if now - e.used > STALE_TMP_S and _unlink(e.path):
                out.temp_files += 1
        else:
            kept.append(e)
    kept.sort(key=lambda e: e.used)
    total = sum(e.size for e in kept)
    while kept and total > max_bytes:
        e = kept.pop(0)
        total -= e.size
        if _unlink(e.path):
            out.entries += 1
            out.bytes += e.size
            out.in_use += now_used - _USED.get(str(e.path), -IN_USE_S) < IN_USE_S
    out.kept_entries, out.kept_bytes = len(kept), total
    return out


def clear(root: str | os.PathLike) -> Removed:
    """Remove every entry under a cache root, the temp files not written to for a minute
    (younger ones belong to a running writer), then the empty folders."""
    root = Path(root).expanduser()
    out = Removed()
    now = time.time()
    for e in entries(root):
        if e.temp and now - e.used < BUSY_TMP_S:
            continue
        if _unlink(e.path):
            if e.temp:
                out.temp_files += 1
            else:
                out.entries += 1
                out.bytes += e.size
    for top in _subdirs(root, _BACKBONE_DIR):
        for shard in _subdirs(top, _SHARD_DIR):
            _rmdir(shard)
        _rmdir(top)
    _SIZE.pop(_root_key(root), None)
    return out


def _rmdir(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (another job writes into it) or gone
        pass


def human(n: float) -> str:
    """A byte count for people: ``1.21 GiB``, ``11.3 MiB``."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def describe(root: str | os.PathLike) -> str:
    """Where a cache folder is and what it holds, in one line."""
    found = list(entries(root))
    size = sum(e.size for e in found if not e.temp)
    n = sum(1 for e in found if not e.temp)
    return f"{Path(root).expanduser().resolve()}: {n} entries, {human(size)}"


def default_dir() -> Path:
    """The default ``backbone.cache.dir``: $ANOMALY_BENCH_CACHE, else
    ``<data_root>/.cache/features`` with data_root $ANOMALY_BENCH_DATA or ``data``."""
    env = os.environ.get("ANOMALY_BENCH_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("ANOMALY_BENCH_DATA", "data")).expanduser() / ".cache/features"
