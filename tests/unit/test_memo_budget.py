"""memory_cache_gb=auto: each job's memo from its own work and its share of the machine."""

from __future__ import annotations

import pytest

from anomaly_bench import memo_budget
from anomaly_bench.memo import MEMO

GIB = 2**30
BLOCKS = {"layer1.0": (256, 4), "layer2.0": (512, 8)}


def test_work_counts_images_their_cached_blocks_and_the_method():
    per_image = 3 * 64 * 64 * 4
    blocks = (256 * 16 * 16 + 512 * 8 * 8) * 4
    assert memo_budget.work(10, (64, 64), BLOCKS, cached=False, derived_bytes=0) == 10 * per_image
    assert memo_budget.work(10, (64, 64), BLOCKS, cached=True, derived_bytes=7) == \
        10 * (per_image + blocks) + 7
    # statistics a method derives per block: every stored block, as other jobs select them
    assert memo_budget.work(10, (64, 64), BLOCKS, cached=True, derived_bytes=100,
                            selected=1) == 10 * (per_image + blocks) + 200


@pytest.mark.parametrize(("available", "cgroup", "workers", "expected"), [
    (20 * GIB, None, 1, 20 * GIB - 2 * GIB - 1 * GIB),          # host: minus reserve, footprint
    (20 * GIB, 6 * GIB, 1, 6 * GIB - 2 * GIB - 1 * GIB),        # a SLURM job's --mem is less
    (20 * GIB, None, 4, (20 * GIB - 3 * GIB) // 4),             # four joblib workers share it
    (2 * GIB, None, 1, 0),                                      # nothing left for a memo
])
def test_share_of_the_machine(monkeypatch, available, cgroup, workers, expected):
    monkeypatch.setattr(memo_budget, "host_available", lambda: available)
    monkeypatch.setattr(memo_budget, "cgroup_available", lambda: cgroup)
    monkeypatch.setattr(memo_budget, "host_reserve", lambda: 2 * GIB)
    MEMO.clear()
    assert memo_budget.share(1 * GIB, workers) == expected


def test_the_budget_is_the_smaller_of_work_and_share(monkeypatch):
    monkeypatch.setattr(memo_budget, "host_available", lambda: 10 * GIB)
    monkeypatch.setattr(memo_budget, "cgroup_available", lambda: None)
    monkeypatch.setattr(memo_budget, "host_reserve", lambda: GIB)
    MEMO.clear()
    memo_budget.set_workers(1)
    small = memo_budget.auto(4, (32, 32), BLOCKS, True, 0, 0)
    assert small.bytes == small.work < 2**20
    memo_budget.set_workers(3)
    big = memo_budget.auto(10_000, (224, 224), BLOCKS, True, 0, 0)
    assert big.work > 9 * GIB and big.bytes == big.share == 3 * GIB
    memo_budget.set_workers(1)


def test_what_the_memo_holds_counts_as_available(monkeypatch):
    monkeypatch.setattr(memo_budget, "host_available", lambda: 4 * GIB)
    monkeypatch.setattr(memo_budget, "cgroup_available", lambda: None)
    monkeypatch.setattr(memo_budget, "host_reserve", lambda: GIB)
    import torch

    MEMO.clear()
    MEMO.configure(GIB)
    MEMO.put("held", torch.zeros(2**20))  # 4 MiB the memo could give back
    assert memo_budget.share(0, 1) == 3 * GIB + 4 * 2**20
    MEMO.clear()


@pytest.mark.parametrize(("launcher", "n_jobs", "workers"), [
    ({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, 72, 1),
    ({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
      "n_jobs": 4}, 72, 4),
    ({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
      "n_jobs": 4}, 2, 2),
    ({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
      "array_parallelism": 8}, 72, 8),
    ({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
      "array_parallelism": 32}, 72, 1),
])
def test_workers_per_launcher(launcher, n_jobs, workers):
    assert memo_budget.workers_of(launcher, n_jobs) == workers


def test_cgroup_limit_is_read_when_there_is_one(tmp_path, monkeypatch):
    """cgroup v2: memory.max - memory.current of the process's own group."""
    import pathlib

    group = tmp_path / "sys" / "job_42"
    group.mkdir(parents=True)
    (group / "memory.max").write_text(f"{8 * GIB}\n")
    (group / "memory.current").write_text(f"{3 * GIB}\n")
    real = pathlib.Path

    def fake(path, *rest):
        text = str(path)
        if text == "/proc/self/cgroup":
            return real(tmp_path / "cgroup")
        if text == "/sys/fs/cgroup":
            return real(tmp_path / "sys")
        return real(path, *rest)

    (tmp_path / "cgroup").write_text("0::/job_42\n")
    monkeypatch.setattr(memo_budget, "Path", fake)
    assert memo_budget.cgroup_available() == 5 * GIB
    (group / "memory.max").write_text("max\n")
    assert memo_budget.cgroup_available() is None
