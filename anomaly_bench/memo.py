"""A process-wide memory of values that are costly to rebuild, bounded in bytes (LRU).

Hydra's basic launcher runs every job of a multirun in one process, one after the other.
The jobs of a sweep over method knobs read the same images, decide the same alignment,
read the same cached block outputs and derive the same per-block statistics; keeping
those in host memory lets every job after the first skip that work. Keys name the inputs
completely (file path, size and modification time, preprocessing, content keys, ...), so
a hit is the value a rebuild would give. Entries are shared, never copied: callers must
not modify what they get. Values on an accelerator are not kept (device memory belongs
to the running job). ``memory_cache_gb`` (top-level config) sets the budget; 0 = off.

The budget is an upper bound: the memo also gives memory back when the machine runs
short. Before keeping a value it reads how much memory the host still has available
(``MemAvailable`` on Linux); below :func:`host_reserve` it evicts until that much is free
again, and keeps nothing while it cannot. Without swap the kernel can reclaim only page
cache, so a memo that keeps growing would push out the very files a job then has to
read; with swap its entries would be paged out and read back slower than the feature
cache's files. Either way a job that finds its values evicted rebuilds them from cheaper
sources (the feature cache reads its files). Eviction takes the least recently used entry
that has a copy elsewhere (``put(..., spill=True)``: block outputs the feature cache also
holds in its files), then the least recently used one of at least :data:`SMALL_BYTES`;
smaller ones (an alignment's decisions, costly to redo and worth nothing to free) go only
when no larger one is left.

Values derived from feature blocks go through :func:`derive`: a method names the
derivation and its parameters, and the memo keys the result on the content of the
inputs when that is known (block outputs that came through the feature cache carry such
a key, see :meth:`~anomaly_bench.backbones.base.Features.lazy`); otherwise the value is
simply computed. Methods thus say what they derive, never how it is cached.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")
log = logging.getLogger("anomaly_bench")

#: Default budget: off until the runner sets it from ``memory_cache_gb``.
DEFAULT_BYTES = 0
#: Entries smaller than this are evicted only when no larger entry is left.
SMALL_BYTES = 64 * 2**10
#: Host memory the memo leaves available: this fraction of the total, at least MIN_RESERVE.
RESERVE_FRACTION = 0.10
MIN_RESERVE = 2**30


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty where there is none)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[name] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    except OSError:
        pass
    return out


def host_available() -> int | None:
    """Bytes of memory the host can still give without swapping (None when unknown)."""
    return _meminfo().get("MemAvailable")


def host_total() -> int | None:
    """Bytes of memory the host has in all (None when unknown)."""
    return _meminfo().get("MemTotal")


def host_reserve() -> int:
    """Bytes of host memory the memo leaves available (0 when the total is unknown)."""
    total = _meminfo().get("MemTotal")
    return 0 if total is None else max(MIN_RESERVE, int(total * RESERVE_FRACTION))


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def nbytes(value: Any) -> int:
    """Bytes held by the tensors in ``value`` (tensors, dicts, lists and tuples of them)."""
    return sum(t.numel() * t.element_size() for t in _tensors(value)) or 64


def content_key(tensor: torch.Tensor) -> str:
    """SHA-1 of a tensor's shape, dtype and bytes: what names a preprocessed image's
    content (the feature cache's entries are named by it)."""
    t = tensor.detach().contiguous().cpu()
    h = hashlib.sha1(f"{tuple(t.shape)}|{t.dtype}".encode())
    h.update(memoryview(t.numpy()).cast("B"))  # the tensor's bytes, without a copy
    return h.hexdigest()


#: Content keys of the rows of batch tensors, attached where the rows' keys were known
#: (memoised samples): id(tensor) -> (weak reference, version when attached, keys).
_ROW_KEYS: dict[int, tuple[weakref.ref, int, tuple[str, ...]]] = {}


def attach_row_keys(batch: torch.Tensor, keys: Sequence[str]) -> None:
    """Record the :func:`content_key` of each row of ``batch`` (computed before, from the
    same values), so that :func:`row_keys` need not hash them again."""
    ident = id(batch)
    ref = weakref.ref(batch, lambda _: _ROW_KEYS.pop(ident, None))
    _ROW_KEYS[ident] = (ref, batch._version, tuple(keys))


def attached_row_keys(batch: torch.Tensor) -> tuple[str, ...] | None:
    """The keys attached to this very tensor when it has not been modified since (its
    version counter), else None."""
    held = _ROW_KEYS.get(id(batch))
    if held is not None and held[0]() is batch and held[1] == batch._version \
            and len(held[2]) == len(batch):
        return held[2]
    return None


def row_keys(batch: torch.Tensor) -> list[str]:
    """The :func:`content_key` of each row of ``batch``: attached, else computed."""
    held = attached_row_keys(batch)
    return list(held) if held is not None else [content_key(row) for row in batch]


def file_stamp(path: str | os.PathLike | None) -> tuple | None:
    """(absolute path, size, mtime in ns) of a file: part of every key read from disk."""
    if path is None:
        return None
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


class Memo:
    """Least-recently-used mapping with a byte budget; thread-safe.

    ``available`` returns the host's available memory in bytes, or None when unknown
    (then only the budget bounds the memo); by default :func:`host_available`.
    ``reserve`` is what must stay available (None: the host's :func:`host_reserve`).
    """

    def __init__(self, budget: int = 4 * 2**30,
                 available: Callable[[], int | None] | None = None,
                 reserve: int | None = None) -> None:
        self.budget = int(budget)
        self._items: OrderedDict[Hashable, tuple[Any, int, bool]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._available = available
        self._reserve = reserve
        self.hits = 0
        self.misses = 0
        #: bytes evicted, and values not kept, because the host was short of memory
        self.shed_bytes = 0
        self.declined = 0
        self._last_told = float("-inf")

    @property
    def reserve(self) -> int:
        if self._reserve is None:
            self._reserve = host_reserve()
        return self._reserve

    def configure(self, budget: int) -> None:
        """Set the budget in bytes, evicting what no longer fits."""
        with self._lock:
            self.budget = max(0, int(budget))
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: Any, size: int | None = None,
            spill: bool = False) -> bool:
        """Keep ``value`` under ``key`` unless it alone exceeds the budget; True when kept.
        Values holding accelerator tensors are not kept: device memory belongs to the
        running job. ``spill``: the value can be read back from elsewhere (a file), so it
        is evicted before values that must be recomputed."""
        if any(t.device.type != "cpu" for t in _tensors(value)):
            return False
        size = nbytes(value) if size is None else int(size)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.budget:
                return False
            if not self._make_room():
                self.declined += 1
                return False
            self._items[key] = (value, size, spill)
            self._bytes += size
            self._evict()
            return True

    def _make_room(self) -> bool:
        """Evict while the host has less than the reserve available; False when that is
        not enough (the value is then not kept)."""
        available = (self._available or host_available)()
        short = 0 if available is None else self.reserve - available
        if short <= 0:
            return True
        freed = 0
        while freed < short and self._items:
            freed += self._pop_victim()
        self.shed_bytes += freed
        if freed:
            from anomaly_bench.allocator import give_back

            give_back()  # the heap keeps freed blocks for reuse; the host needs them now
        now = time.monotonic()
        if now - self._last_told > 60:
            self._last_told = now
            log.info("memory is short (%.1f GiB available, %.1f GiB kept free): the "
                     "in-process memo gave back %.2f GiB and holds %.2f GiB; jobs rebuild "
                     "what it dropped (block outputs from the feature cache's files)",
                     available / 2**30, self.reserve / 2**30, freed / 2**30,
                     self._bytes / 2**30)
        return freed >= short

    def get_or_compute(self, key: Hashable, compute: Callable[[], T]) -> T:
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value

    @property
    def size(self) -> int:
        return self._bytes

    def _evict(self) -> None:
        while self._bytes > self.budget and self._items:
            self._pop_victim()

    def _pop_victim(self) -> int:
        """Remove the least recently used entry with a copy elsewhere, else the least
        recently used one of at least SMALL_BYTES, else the least recently used one;
        return its size."""
        items = self._items.items()
        victim = next((k for k, (_, _, spill) in items if spill), None)
        if victim is None:
            victim = next((k for k, (_, size, _) in items if size >= SMALL_BYTES), None)
        if victim is None:
            victim = next(iter(self._items))
        _, size, _ = self._items.pop(victim)
        self._bytes -= size
        return size


#: The process-wide instance.
MEMO = Memo(DEFAULT_BYTES)


def _versions(value: Any) -> tuple[int, ...]:
    return tuple(t._version for t in _tensors(value))


def _hashable(value: Any) -> Hashable:
    """A key part for a derivation parameter: tensors by dtype, shape and bytes."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        return ("tensor", str(t.dtype), tuple(t.shape),
                t.reshape(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


class Derived(Generic[T]):
    """A value computed from feature blocks, with the key naming its content when known.

    Build one with :func:`known` (a value at hand) or :func:`derive` (a value computed from
    others). ``key`` is None when the content of some input is unknown, and also once a
    tensor of a :func:`known` value has been modified in place (a checkpoint loaded into
    it): the value is then what it is, but nothing may be memoised under its name.
    """

    __slots__ = ("_compute", "_key", "_value", "_versions")

    def __init__(self, key: Hashable | None, value: Any = None,
                 compute: Callable[[], T] | None = None) -> None:
        self._key = key
        self._value = value
        self._compute = compute
        self._versions = _versions(value) if compute is None and key is not None else None

    @property
    def key(self) -> Hashable | None:
        if self._versions is not None and self._versions != _versions(self._value):
            return None
        return self._key

    @property
    def value(self) -> T:
        """The value: at hand, taken from the memo, or computed (and kept)."""
        if self._compute is None:
            return self._value
        return MEMO.get_or_compute(self._key, self._compute)


def known(value: T, key: Hashable | None = None) -> Derived[T]:
    """``value`` as an input of :func:`derive`; ``key`` names its content (None: unknown)."""
    return Derived(key, value=value)


Input = Derived | Sequence[Derived]


def _key_of(item: Input) -> Hashable | None:
    if isinstance(item, Derived):
        return item.key
    keys = tuple(d.key for d in item)
    return None if any(k is None for k in keys) else keys


def _value_of(item: Input) -> Any:
    return item.value if isinstance(item, Derived) else [d.value for d in item]


def derive(name: str, fn: Callable[..., T], *inputs: Input, **params: Any) -> Derived[T]:
    """``fn(*values of inputs, **params)``, memoised when every input's content is known.

    ``name`` identifies the derivation (two derivations never share a name); ``params``
    are passed to ``fn`` and are part of the key (tensors by value). An input is a
    :class:`Derived` or a sequence of them (``fn`` then gets the list of their values).
    When some input's content is unknown the value is computed now, with no key. When
    all are known it is computed on first use of ``.value``, from the process memo when
    an earlier job derived it already, and kept there.
    """
    keys = [_key_of(i) for i in inputs]
    if any(k is None for k in keys):
        return Derived(None, value=fn(*(_value_of(i) for i in inputs), **params))
    key = (name, _hashable(params), tuple(keys))

    def compute() -> T:
        return fn(*(_value_of(i) for i in inputs), **params)

    return Derived(key, compute=compute)
