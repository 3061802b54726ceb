"""Sweeps end to end: launchers agree, a failed job is recorded while the others run, and
a killed sweep re-run into its directory redoes nothing that finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anomaly_bench.report.results import read_rows
from anomaly_bench.sweep import JOB_RECORD, SWEEP_RECORD

from cli_helpers import FAST, make_mvtec, run_cli

pytestmark = pytest.mark.slow

#: results.csv columns that measure the machine, not the result
COSTS = {"train_s", "test_s", "ms_per_image", "peak_mem_mb"}


def _common(root: Path) -> list[str]:
    return ["dataset=mvtec", f"dataset.root={root}", "dataset.category=bottle",
            "plots.enabled=false", "summary.order=sweep"]


def _jobs(sweep: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / JOB_RECORD).read_text())
            for p in sweep.iterdir() if (p / JOB_RECORD).is_file()}


def _results(sweep: Path) -> dict[str, list[dict[str, str]]]:
    return {name: [{k: v for k, v in r.items() if k not in COSTS}
                   for r in read_rows(sweep / name / "results.csv")]
            for name in _jobs(sweep)}


def _summary(sweep: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in COSTS}
            for r in read_rows(sweep / "summary.csv")]


def test_launchers_give_the_basic_launchers_results_and_summary(tmp_path):
    """The same two-job sweep through Hydra's basic launcher, the submitit local executor
    and joblib (two worker processes): the same job directories, rows and summary."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    root = make_mvtec(tmp_path / "mvtec", categories=("bottle",))
    got = {}
    for launcher in ("basic", "submitit_local", "parallel"):
        sweep = tmp_path / f"sweep_{launcher}"
        extra = ["hydra.launcher.n_jobs=2"] if launcher == "parallel" else []
        res = run_cli(["-m", *FAST, *_common(root), "seed=0,1", f"hydra/launcher={launcher}",
                       *extra, f"hydra.sweep.dir={sweep}"], tmp_path / "unused", cwd=tmp_path,
                      fast=False)
        assert res.code == 0, res.stderr[-3000:]
        assert {r["status"] for r in _jobs(sweep).values()} == {"finished"}
        got[launcher] = (_results(sweep), _summary(sweep),
                         [line for line in (sweep / "summary.md").read_text().splitlines()
                          if line.startswith("|")])
    basic = got["basic"]
    assert len(basic[0]) == 2 and len(basic[1]) == 2
    assert got["submitit_local"] == basic
    assert got["parallel"] == basic


def _break_category(root: Path, category: str) -> Path:
    """One truncated test image: reading it is a data error in that category only."""
    bad = root / category / "test" / "good" / "000.png"
    bad.write_bytes(bad.read_bytes()[:40])
    return bad


def test_a_failed_job_is_recorded_and_the_others_run(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    bad = _break_category(root, "screw")
    sweep = tmp_path / "sweep"
    args = ["-m", *FAST, "dataset=mvtec", f"dataset.root={root}",
            "dataset.category=screw,bottle", "plots.enabled=false", f"hydra.sweep.dir={sweep}"]
    res = run_cli(args, tmp_path / "unused", cwd=tmp_path, fast=False)
    assert res.code == 2, res.stderr[-3000:]
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("anomaly-bench: error: 1 of 2 jobs of the sweep did not finish")
    assert "dataset.category=screw" in err and bad.name in err
    jobs = _jobs(sweep)
    status = {next(o for o in r["overrides"] if o.startswith("dataset.category=")): r["status"]
              for r in jobs.values()}
    assert status == {"dataset.category=screw": "failed", "dataset.category=bottle": "finished"}
    failed = next(r for r in jobs.values() if r["status"] == "failed")
    assert failed["error"]["exit_code"] == 2 and bad.name in failed["error"]["message"]
    # the summary holds the finished job's row and the failed job with its error
    rows = read_rows(sweep / "summary.csv")
    assert [r["category"] for r in rows if not r.get("error")] == ["bottle"]
    assert [bad.name in r["error"] for r in rows if r.get("error")] == [True]
    md = (sweep / "summary.md").read_text()
    assert "## Failed jobs (1)" in md and bad.name in md
    # repaired data: the re-run reuses the finished job and reruns the failed one
    make_mvtec(root)
    res = run_cli(args, tmp_path / "unused", cwd=tmp_path, fast=False)
    assert res.code == 0, res.stderr[-3000:]
    assert "1 ran, 1 reused" in res.stdout
    assert {r["status"] for r in _jobs(sweep).values()} == {"finished", "reused"}
    assert "Failed jobs" not in (sweep / "summary.md").read_text()


def test_a_killed_sweep_rerun_redoes_nothing_finished(tmp_path):
    """SIGTERM in the middle of a sweep, then the same sweep with one more value: the jobs
    finished before are reused (their files untouched), the others run, the summary is
    complete."""
    root = make_mvtec(tmp_path / "mvtec", categories=("bottle",))
    sweep = tmp_path / "sweep"
    args = [*FAST, *_common(root), f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen([sys.executable, "-m", "anomaly_bench.cli", "-m", *args,
                             "seed=0,1,2"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            jobs = _jobs(sweep) if sweep.is_dir() else {}
            if any(r["status"] == "finished" for r in jobs.values()):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    assert "hydra.sweep.dir=" in stderr.strip().splitlines()[-1]
    finished = {name: (sweep / name / "results.csv").read_bytes()
                for name, r in _jobs(sweep).items() if r["status"] == "finished"}
    assert 1 <= len(finished) < 3
    for name in _jobs(sweep):  # never a partial row
        if (sweep / name / "results.csv").exists():
            assert len(read_rows(sweep / name / "results.csv")) <= 1
    stamps = {name: (sweep / name / "results.csv").stat().st_mtime_ns for name in finished}

    res = run_cli(["-m", *args, "seed=0,1,2,3"], tmp_path / "unused", cwd=tmp_path, fast=False)
    assert res.code == 0, res.stderr[-3000:]
    jobs = _jobs(sweep)
    assert len(jobs) == 4
    reused = {name for name, r in jobs.items() if r["status"] == "reused"}
    assert reused == set(finished)
    assert f"{4 - len(finished)} ran, {len(finished)} reused" in res.stdout
    for name in finished:
        assert (sweep / name / "results.csv").read_bytes() == finished[name]
        assert (sweep / name / "results.csv").stat().st_mtime_ns == stamps[name]
        assert f"({name}): finished before" in res.stdout
    rows = read_rows(sweep / "summary.csv")
    assert sorted(r["seed"] for r in rows) == ["0", "1", "2", "3"]
    assert "seed=3" in json.loads((sweep / SWEEP_RECORD).read_text())["jobs"][3]
