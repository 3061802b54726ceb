"""Device resolution, seeding, timing and peak-memory measurement."""

from __future__ import annotations

import os
import random
import threading
import time
from types import TracebackType

import numpy as np
import torch

from anomaly_bench.errors import ConfigError


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda``/``cuda:N`` must exist."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={spec} but torch sees no CUDA device on this machine "
                f"(torch {torch.__version__}); use device=cpu or device=auto."
            )
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device={spec} but only {torch.cuda.device_count()} CUDA device(s) exist."
            )
        return dev
    raise ConfigError(f"device={spec} is not one of auto, cpu, cuda, cuda:N.")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 - third-party code uses the global RNG
    torch.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # not Linux: fall back to the process-lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Peak memory inside a ``with`` block, in MiB.

    On CUDA: the allocator's peak of allocated device memory. On CPU: the peak resident
    set size of the process, sampled every 20 ms by a background thread.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.02) -> None:
        self.device = device
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_mb = _rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, _rss_mb())

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_mb = max(self.peak_mb, _rss_mb())


class Stopwatch:
    """Accumulates the time of the work done in several ``with`` blocks.

    On CUDA each block is bracketed by two CUDA events recorded on the stream, which cost
    no synchronisation: a per-batch loop timed with it keeps the GPU queue full, and the
    elapsed times are read once, when :attr:`seconds` is asked for (after the loop). On
    the CPU it is wall-clock time.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._seconds = 0.0
        self._t0 = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def __enter__(self) -> Stopwatch:
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(self.device))
            self._events.append((start, torch.cuda.Event(enable_timing=True)))
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self._events[-1][1].record(torch.cuda.current_stream(self.device))
        else:
            self._seconds += time.perf_counter() - self._t0

    @property
    def seconds(self) -> float:
        """Total seconds of the blocks so far (on CUDA: waits for their last event)."""
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1000
            self._events.clear()
        return self._seconds


#: Data-loading processes of num_workers=auto on a CUDA device (at most).
CUDA_LOADER_WORKERS = 8


def loader_workers(spec: int | str, device: torch.device) -> int:
    """``num_workers``: a number, or ``auto`` = none on the CPU (its cores compute the
    model) and on CUDA one per available core but one, at most :data:`CUDA_LOADER_WORKERS`
    (decoding and resizing overlap the GPU's work)."""
    if spec != "auto":
        return int(spec)
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(CUDA_LOADER_WORKERS, (cores or 1) - 1))


def release(device: torch.device) -> None:
    """Give a CUDA device's cached blocks back (between categories and jobs), so the next
    fit, another job's process or another user's sees the memory free."""
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()
