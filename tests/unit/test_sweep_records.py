"""Sweep jobs' directories, records and the end of a launch, without running a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from anomaly_bench import sweep
from anomaly_bench.errors import ConfigError, DataError
from anomaly_bench.report.results import read_rows, write_row


def _row(category: str, auroc: float, seed: int) -> dict:
    return {"method": "padim", "backbone": "resnet18", "weights": "random(seed=0)",
            "dataset": "mvtec", "category": category, "layers": "l", "resolution": "64",
            "alignment": "none", "seed": seed, "image_auroc": auroc, "pixel_auroc": auroc,
            "aupro": auroc, "image_f1_max": auroc, "n_train": 4, "n_test": 4, "train_s": 1.0,
            "test_s": 1.0, "ms_per_image": 1.0, "peak_mem_mb": 1.0, "device": "cpu",
            "overrides": f"seed={seed}"}


def test_job_dir_is_named_by_the_resolved_config():
    cfg = OmegaConf.create({"seed": 1, "root": "/d", "data": "${root}/x", "resume": True,
                            "summary": {"label": "a", "metric": "aupro"},
                            "hydra": {"sweep": {"subdir": "${job_dir:}"}}})
    name = cfg.hydra.sweep.subdir
    assert name == sweep.job_dir_name({"seed": 1, "root": "/d", "data": "/d/x",
                                       "summary": {"label": "a"}})
    assert name.startswith("job-") and len(name) == 16
    # resuming and the table's layout never make another job; every other key does, and
    # so does a job's label (presets computing alike are distinct rows of the table)
    same = OmegaConf.merge(cfg, {"resume": False, "summary": {"metric": "pixel_auroc"}})
    assert same.hydra.sweep.subdir == name
    assert OmegaConf.merge(cfg, {"root": "/e"}).hydra.sweep.subdir != name
    assert OmegaConf.merge(cfg, {"summary": {"label": "b"}}).hydra.sweep.subdir != name


def test_expand_gives_every_job_and_the_fixed_and_swept_keys():
    plan = sweep.expand(["layers.layer1=0,1", "data_root=/d", "seed=0,1,2"])
    assert len(plan.jobs) == 6
    assert plan.jobs[0] == ["layers.layer1=0", "data_root=/d", "seed=0"]
    assert plan.fixed == {"data_root": "/d"} and plan.swept == ["layers.layer1", "seed"]


@pytest.mark.parametrize(("now", "conflict"), [
    (["method=padim", "seed=0,1,2"], None),             # a value added to a swept key
    (["method=padim", "seed=1"], None),                  # a subset of the swept values
    (["method=padim", "seed=0,1", "layers.layer1=0,1"], None),  # a new swept key
    (["method=patchcore", "seed=0,1"], "method=padim there, method=patchcore now"),
    (["seed=0,1"], "method=padim there, not given now"),
    (["method=padim", "seed=0,1", "num_workers=4"], "num_workers=4 now, not given there"),
])
def test_a_sweep_directory_takes_only_the_same_sweep(tmp_path, now, conflict):
    def config(overrides):
        return OmegaConf.create({"hydra": {
            "sweep": {"dir": str(tmp_path)},
            "sweeper": {"_target_": sweep.BASIC_SWEEPERS[0], "params": {}},
            "overrides": {"task": overrides}}})

    sweep.start(config(["method=padim", "seed=0,1"]))
    first = json.loads((tmp_path / sweep.SWEEP_RECORD).read_text())
    if conflict is None:
        sweep.start(config(now))
        assert json.loads((tmp_path / sweep.SWEEP_RECORD).read_text())["id"] != first["id"]
    else:
        with pytest.raises(ConfigError, match=f"holds the jobs of another sweep .*{conflict}"):
            sweep.start(config(now))


def _launch(tmp_path: Path, n: int) -> Path:
    cfg = OmegaConf.create({"hydra": {
        "sweep": {"dir": str(tmp_path / "sweep")},
        "sweeper": {"_target_": sweep.BASIC_SWEEPERS[0], "params": {}},
        "overrides": {"task": [f"seed={','.join(map(str, range(n)))}"]}}})
    (tmp_path / "sweep").mkdir()
    sweep.start(cfg)
    return tmp_path / "sweep"


def _job(sweep_dir: Path, num: int, work) -> Path:
    job_dir = sweep_dir / f"job-{num:012d}"
    sweep.run_job(job_dir, sweep_dir, num, [f"seed={num}"], work)
    return job_dir


def test_failed_jobs_are_recorded_and_the_last_job_writes_the_summary(tmp_path):
    """Jobs end in any order, one with bad data and one out of memory; no process is
    left to run Hydra's end-of-sweep callback: the last job to end writes the summary."""
    sweep_dir = _launch(tmp_path, 3)

    def finished(num):
        def work():
            write_row(sweep_dir / f"job-{num:012d}" / "results.csv", _row("x", 0.5 + num / 10,
                                                                            num))
            return False
        return work

    def bad_data():
        raise DataError("x/test/good/000.png: truncated image")

    def out_of_memory():
        raise MemoryError("cannot allocate 9 GiB")

    _job(sweep_dir, 2, finished(2))
    _job(sweep_dir, 0, bad_data)
    assert not (sweep_dir / "summary.md").exists()  # job 1 has not ended
    _job(sweep_dir, 1, out_of_memory)
    md = (sweep_dir / "summary.md").read_text()
    assert "## Failed jobs (2)" in md and "truncated image" in md and "MemoryError" in md
    rows = read_rows(sweep_dir / "summary.csv")
    assert [(r["job"], bool(r["error"])) for r in rows] == [
        ("job-000000000002", False), ("job-000000000000", True), ("job-000000000001", True)]
    state = sweep.outcome(sweep_dir)
    line, failure, code = sweep.report(state)
    assert line.startswith("3 jobs: 1 ran, 0 reused (finished before), 2 failed")
    assert failure.startswith("2 of 3 jobs of the sweep did not finish: job 0 (seed=0; ")
    assert "truncated image" in failure and "MemoryError: cannot allocate" in failure
    assert code == 1  # one of them is not an input error
    # the summary is current: the end-of-sweep callback does not draw it again
    assert sweep.summarise(sweep_dir) is None


def test_a_job_that_never_reported_is_listed(tmp_path):
    sweep_dir = _launch(tmp_path, 2)
    _job(sweep_dir, 0, lambda: False)
    state = sweep.outcome(sweep_dir)
    assert not state.done
    _, failure, code = sweep.report(state)
    assert "job 1 (seed=1): it never started or never reported" in failure and code == 1


def test_an_interrupted_job_is_recorded_and_the_interrupt_passed_on(tmp_path):
    sweep_dir = _launch(tmp_path, 1)

    def stop():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _job(sweep_dir, 0, stop)
    record = json.loads((sweep_dir / "job-000000000000" / sweep.JOB_RECORD).read_text())
    assert record["status"] == "interrupted"


def test_two_jobs_of_one_configuration_share_a_record(tmp_path):
    """A repeated sweep value makes two jobs with one directory: the record stands for
    both, and the launch counts both as ended."""
    sweep_dir = _launch(tmp_path, 2)
    job_dir = sweep_dir / "job-same"
    sweep.run_job(job_dir, sweep_dir, 0, ["seed=0"], lambda: False)
    sweep.run_job(job_dir, sweep_dir, 1, ["seed=0"], lambda: True)
    state = sweep.outcome(sweep_dir)
    assert state.done and state.status(0) == state.status(1) == "reused"
