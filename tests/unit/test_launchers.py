"""The launcher presets: what the SLURM preset hands to submitit, and the checks before a
sweep is submitted (no cluster needed)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from anomaly_bench.configs import config_dir
from anomaly_bench.errors import ConfigError
from anomaly_bench.launchers import check_launcher, check_overrides

submitit = pytest.importorskip("submitit")


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def _fake_commands(folder: Path, monkeypatch, **scripts: str) -> None:
    """Executables named as the keys, printing the values, first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, output in scripts.items():
        path = folder / name
        path.write_text(f"#!/bin/sh\nprintf '{output}'\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_slurm_preset_gives_submitit_its_sbatch_parameters(tmp_path, monkeypatch):
    """The preset's keys reach the sbatch script submitit writes: partition, account, one
    GPU per job, CPUs, memory, time, the requeue signal, array parallelism, requeues."""
    _fake_commands(tmp_path / "bin", monkeypatch, srun="", sbatch="")
    cfg = _compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                    "hydra.launcher.account=lab", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                    "hydra.job.name=anomaly-bench"])
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    captured = {}

    def map_array(self, fn, *args):
        captured["executor"] = self
        captured["jobs"] = list(zip(*args, strict=True))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    launcher.launch([["seed=0"], ["seed=1"], ["seed=2"]], initial_job_idx=0)
    slurm = captured["executor"]._executor
    assert type(slurm).__name__ == "SlurmExecutor"
    assert len(captured["jobs"]) == 3
    assert slurm.max_num_timeout == 3
    assert slurm.parameters["array_parallelism"] == 32
    text = slurm._make_submission_file_text("python -m submitit.core._submit X", "uid")
    lines = set(text.splitlines())
    for directive in ("--partition=gpu", "--account=lab", "--gpus-per-node=1",
                      "--cpus-per-task=8", "--mem=32GB", "--time=240", "--ntasks-per-node=1",
                      "--nodes=1", "--signal=USR2@120", "--job-name=anomaly-bench"):
        assert f"#SBATCH {directive}" in lines, (directive, text)
    assert str(slurm.folder).startswith(str(tmp_path / "sweep" / ".submitit"))


def test_slurm_preset_takes_site_values_from_the_environment(monkeypatch):
    monkeypatch.setenv("ANOMALY_BENCH_SLURM_PARTITION", "a100")
    monkeypatch.setenv("ANOMALY_BENCH_SLURM_ACCOUNT", "vision")
    cfg = _compose(["hydra/launcher=slurm"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    resolved = {k: cfg.hydra.launcher[k] for k in ("partition", "account")}
    assert resolved == {"partition": "a100", "account": "vision"}
    assert launcher["_target_"].endswith("SlurmLauncher")


def test_parallel_preset_is_joblib_in_processes():
    cfg = _compose(["hydra/launcher=parallel", "hydra.launcher.n_jobs=3"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 3
    assert cfg.hydra.launcher.prefer == "processes"


def _slurm(**keys) -> dict:
    return {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
            **keys}


def test_slurm_without_slurm_is_one_paragraph(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun, no sbatch
    with pytest.raises(ConfigError, match=r"no SLURM .*hydra/launcher=parallel"):
        check_launcher(_slurm(partition="gpu"))
    check_launcher({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"})


def test_slurm_partition_missing_or_unknown(tmp_path, monkeypatch):
    _fake_commands(tmp_path / "bin", monkeypatch, srun="", sbatch="", sinfo="gpu*\\ncpu\\n")
    with pytest.raises(ConfigError, match=r"needs a partition.*ANOMALY_BENCH_SLURM_PARTITION"):
        check_launcher(_slurm(partition=None))
    with pytest.raises(ConfigError, match=r"partition=gpus is not a partition.*cpu, gpu"):
        check_launcher(_slurm(partition="gpus"))
    check_launcher(_slurm(partition="gpu"))


def test_unknown_launcher_key_names_the_key_and_the_known_ones():
    with pytest.raises(ConfigError, match=r"hydra.launcher.partiton is not a setting of "
                                          r"hydra/launcher=slurm.*partition"):
        check_overrides(["-m", "hydra/launcher=slurm", "hydra.launcher.partiton=gpu"], _compose)
    check_overrides(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "seed=1"],
                    _compose)
