"""The in-process memo's budget for ``memory_cache_gb=auto``: each job's own work, bounded
by its share of the machine.

A job of a sweep can reuse, from the memo, what it and the jobs before it in the same
process read: the preprocessed images of its categories, the block outputs the feature
cache serves for them, and what its method derives from those (PaDiM's per-block
statistics and test cross terms, the method's ``memo_bytes``). That is the job's *work*;
more memo than that is never filled. Its *share* of the machine is the memory it may
still take: the host's ``MemAvailable``, or what the job's cgroup allows when that is less
(a SLURM job's ``--mem``, a container's limit), plus what the memo already holds (it can
give that back), minus the memory the host keeps free (:func:`~anomaly_bench.memo.host_reserve`)
and what the job itself needs (:mod:`anomaly_bench.footprint`), divided among the worker
processes of this sweep on the host (joblib's ``n_jobs``, submitit's local processes; one
for SLURM jobs, which each have their own cgroup, and for Hydra's basic launcher).
The budget is the smaller of the two. The memo still gives memory back at run time when
the host runs short (:mod:`anomaly_bench.memo`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from anomaly_bench.memo import MEMO, host_available, host_reserve

FLOAT = 4
#: Worker processes of the current sweep on this host (set by the job before it runs).
WORKERS = 1


def set_workers(n: int) -> None:
    global WORKERS
    WORKERS = max(1, int(n))


def workers_of(launcher: dict, n_jobs: int) -> int:
    """Processes a launcher runs at once on this host for a sweep of ``n_jobs`` jobs."""
    target = str(launcher.get("_target_", ""))
    if target.endswith("JoblibLauncher"):
        n, cpus = int(launcher.get("n_jobs") or 1), os.cpu_count() or 1
        return min(n_jobs, cpus if n < 0 else n)
    if target.endswith("submitit_launcher.LocalLauncher"):
        return min(n_jobs, int(launcher.get("array_parallelism") or n_jobs))
    return 1  # the basic launcher (one process), SLURM (a cgroup per job)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cgroup_available() -> int | None:
    """Bytes the process's cgroup still allows (limit - usage), or None without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        base = Path("/sys/fs/cgroup")
        if controllers == "":  # cgroup v2
            folder = base / path.lstrip("/")
            limit, used = _read_int(folder / "memory.max"), _read_int(folder / "memory.current")
        elif "memory" in controllers.split(","):  # cgroup v1
            folder = base / "memory" / path.lstrip("/")
            limit = _read_int(folder / "memory.limit_in_bytes")
            used = _read_int(folder / "memory.usage_in_bytes")
            if limit is not None and limit >= 1 << 60:  # "no limit"
                limit = None
        else:
            continue
        if limit is not None and used is not None:
            return max(0, limit - used)
    return None


@dataclass(frozen=True)
class Budget:
    """How ``memory_cache_gb=auto`` sized the memo (bytes)."""

    work: int
    share: int | None

    @property
    def bytes(self) -> int:
        return self.work if self.share is None else max(0, min(self.work, self.share))


def share(footprint_bytes: int, workers: int | None = None) -> int | None:
    """This job's share of the machine for its memo (None when the host's memory is unknown)."""
    available = [v for v in (host_available(), cgroup_available()) if v is not None]
    if not available:
        return None
    free = min(available) + MEMO.size - host_reserve() - int(footprint_bytes)
    return max(0, free // (workers or WORKERS))


def work(n_images: int, size: tuple[int, int], stored_blocks: dict[str, tuple[int, int]],
         cached: bool, derived_bytes: int, selected: int = 0) -> int:
    """Bytes of what a job over ``n_images`` images of ``size`` (H, W) keeps in the memo:
    each preprocessed image (3 x H x W float32), the block outputs the feature cache serves
    per image when it is on (``stored_blocks``: name -> (channels the memo keeps, stride),
    :meth:`~anomaly_bench.backbones.base.Backbone.memo_blocks`), and what the
    method derives from them (``derived_bytes`` for its ``selected`` blocks,
    :meth:`~anomaly_bench.methods.AnomalyMethod.memo_bytes`), per block, for every stored
    block the sweep's other jobs select."""
    h, w = size
    per_image = 3 * h * w * FLOAT
    derived = int(derived_bytes)
    if cached:
        per_image += sum(c * max(1, h // s) * max(1, w // s) * FLOAT
                         for c, s in stored_blocks.values())
        if selected:
            derived = derived * max(len(stored_blocks), selected) // selected
    return n_images * per_image + derived


def auto(n_images: int, size: tuple[int, int], stored_blocks: dict[str, tuple[int, int]],
         cached: bool, derived_bytes: int, footprint_bytes: int, selected: int = 0) -> Budget:
    """The memo budget of a job (:class:`Budget`): its work bounded by its share."""
    return Budget(work(n_images, size, stored_blocks, cached, derived_bytes, selected),
                  share(footprint_bytes))
