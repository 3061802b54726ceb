"""A process-wide memory of values that are costly to rebuild, bounded in bytes (LRU).

Hydra's basic launcher runs every job of a multirun in one process, one after the other.
The jobs of a sweep over method knobs read the same images, decide the same alignment,
read the same cached block outputs and derive the same per-block statistics; keeping
those in host memory lets every job after the first skip that work. Keys name the inputs
completely (file path, size and modification time, preprocessing, content keys, ...), so
a hit is the value a rebuild would give. Entries are shared, never copied: callers must
not modify what they get. Values on an accelerator are not kept (device memory belongs
to the running job). ``memory_cache_gb`` (top-level config) sets the budget; 0 = off.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch

T = TypeVar("T")

#: Default budget: off until the runner sets it from ``memory_cache_gb``.
DEFAULT_BYTES = 0


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


def file_stamp(path: str | os.PathLike | None) -> tuple | None:
    """(absolute path, size, mtime in ns) of a file: part of every key read from disk."""
    if path is None:
        return None
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


class Memo:
    """Least-recently-used mapping with a byte budget; thread-safe."""

    def __init__(self, budget: int = 4 * 2**30) -> None:
        self.budget = int(budget)
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

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

    def put(self, key: Hashable, value: Any, size: int | None = None) -> None:
        """Keep ``value`` under ``key`` unless it alone exceeds the budget. Values holding
        accelerator tensors are not kept: device memory belongs to the running job."""
        if any(t.device.type != "cpu" for t in _tensors(value)):
            return
        size = nbytes(value) if size is None else int(size)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.budget:
                return
            self._items[key] = (value, size)
            self._bytes += size
            self._evict()

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
            _, (_, size) = self._items.popitem(last=False)
            self._bytes -= size


#: The process-wide instance.
MEMO = Memo(DEFAULT_BYTES)
