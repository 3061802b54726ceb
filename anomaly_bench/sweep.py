"""The jobs of a sweep: where each one writes, what it left, and when the sweep is done.

A job's directory under the sweep directory is named by its resolved configuration
(``job-<digest>``, :func:`job_dir_name`), not by its number: re-running a sweep into its
directory finds every finished job where it left it, also after values were added to a
swept key (which renumbers the jobs), under any launcher, and a SLURM job requeued after
a timeout or preemption lands in its own directory again and resumes from what it wrote
there (finished categories, a method's training state).

Each job keeps a record (``job.json``: status, number, overrides, error) and the sweep a
manifest (``sweep.json``: an id per launch, every job's overrides in sweep order, the
fixed and swept keys). A job that fails is recorded with its error and the sweep goes on;
the last job of a launch to end writes the sweep summary (Hydra's end-of-sweep callback
is skipped when a job fails and never runs when the submitting process dies), and the
submitting process, when it is still there, lists the failed jobs and exits non-zero.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from anomaly_bench.errors import AnomalyBenchError, ConfigError, some
from anomaly_bench.fsutil import atomic_open, describe

log = logging.getLogger("anomaly_bench")

JOB_RECORD = "job.json"
SWEEP_RECORD = "sweep.json"
#: Keys that never tell two jobs apart: resuming, and the sweep's table layout (a job's
#: ``summary.label`` does: presets that compute alike are still distinct rows).
NOT_JOB_KEYS = ("resume", "summary")
SUMMARY_JOB_KEYS = ("label",)
#: Job states after which a job no longer runs.
ENDED = ("finished", "reused", "failed")
#: (paragraph, exit code) when the jobs of the sweep that just ended did not all finish.
FAILURE: tuple[str, int] | None = None
#: The sweep directory of the sweep this process launched (for the Ctrl-C message).
CURRENT: Path | None = None
#: The basic sweeper and ours (the same jobs, each composed once: :mod:`~anomaly_bench.
#: sweeper`), the only ones whose job list is known before the jobs run.
BASIC_SWEEPERS = ("hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                  "hydra_plugins.anomaly_bench_sweeper.Sweeper")


# ----------------------------------------------------------------------------- job dirs
def job_dir_name(task: Mapping[str, Any]) -> str:
    """``job-<12 hex>``: the SHA-256 of a job's resolved configuration (``hydra`` and
    :data:`NOT_JOB_KEYS` left out), so equal configurations share one directory."""
    kept = {k: v for k, v in task.items() if k != "hydra" and k not in NOT_JOB_KEYS}
    summary = task.get("summary")
    if isinstance(summary, Mapping) and any(summary.get(k) for k in SUMMARY_JOB_KEYS):
        kept["summary"] = {k: summary.get(k) for k in SUMMARY_JOB_KEYS}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return "job-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def _job_dir_resolver(*, _root_: DictConfig) -> str:
    try:
        task = {str(k): OmegaConf.to_container(_root_[k], resolve=True) if
                OmegaConf.is_config(_root_[k]) else _root_[k]
                for k in _root_ if k != "hydra" and k != "resume"}
    except Exception as exc:  # the run reports the key that does not resolve
        raise ConfigError(f"the configuration cannot be resolved: {exc}") from None
    return job_dir_name(task)


def register_resolver() -> None:
    """``${job_dir:}`` (``hydra.sweep.subdir`` in conf/config.yaml)."""
    if not OmegaConf.has_resolver("job_dir"):
        OmegaConf.register_new_resolver("job_dir", _job_dir_resolver)


register_resolver()


def is_job_dir(path: Path) -> bool:
    """A job's directory in a sweep directory: one with a job record or Hydra's files
    (or a number, as sweeps written before job records were named)."""
    return path.is_dir() and (path.name.isdigit() or (path / JOB_RECORD).is_file()
                              or (path / ".hydra").is_dir())


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    with atomic_open(path, "w") as fh:
        json.dump(value, fh, indent=1, sort_keys=True)


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job directory of a sweep: this launch's jobs in sweep order, then the others
    (earlier launches into the same directory) by their number, then by name."""
    sweep_dir = Path(sweep_dir)
    current = (read_json(sweep_dir / SWEEP_RECORD) or {}).get("id")
    found = []
    for path in sweep_dir.iterdir() if sweep_dir.is_dir() else ():
        if not is_job_dir(path):
            continue
        record = read_json(path / JOB_RECORD) or {}
        num = record.get("num")
        num = int(path.name) if path.name.isdigit() else num if isinstance(num, int) else 1 << 30
        found.append(((record.get("sweep") != current or current is None), num, path.name, path))
    return [p for *_, p in sorted(found)]


# ----------------------------------------------------------------------------- the plan
@dataclass
class SweepPlan:
    """A launch's jobs as the basic sweeper expands them: each job's overrides in sweep
    order, the keys given one value (``fixed``) and the swept keys."""

    jobs: list[list[str]]
    fixed: dict[str, str] = field(default_factory=dict)
    swept: list[str] = field(default_factory=list)


def plan(config: DictConfig) -> SweepPlan | None:
    """The jobs a multirun launches, expanded as Hydra's basic sweeper does (its
    ``hydra.sweeper.params`` first, then the command line); None for another sweeper."""
    if str(config.hydra.sweeper.get("_target_")) not in BASIC_SWEEPERS:
        return None
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    task = list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    return expand([*params, *task])


def expand(overrides: Sequence[str]) -> SweepPlan:
    """Every job's overrides from a multirun's overrides (``a=1,2 b=3`` gives two jobs)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    fixed, swept = {}, []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            swept.append(key)
            fixed.pop(key, None)
        else:
            fixed[key] = o.get_value_element_as_str()
            swept = [k for k in swept if k != key]
    return SweepPlan(BasicSweeper.split_arguments(parsed, None)[0], fixed, swept)


def job_overrides(overrides: Sequence[str],
                  compose: Callable[[Sequence[str]], DictConfig]) -> list[list[str]]:
    """Every job's overrides of ``anomaly-bench -m <overrides>``, with the sweeps an
    ``experiment=`` preset declares (``hydra.sweeper.params``) expanded as Hydra does;
    ``compose`` composes one job's configuration (:func:`anomaly_bench.configs.composer`)."""
    out: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for job in expand(overrides).jobs:
        params = compose(job).hydra.sweeper.get("params") or {}
        for final in expand([*(f"{k}={v}" for k, v in params.items()), *job]).jobs:
            if tuple(final) not in seen:
                seen.add(tuple(final))
                out.append(final)
    return out


def _conflicts(before: Mapping[str, Any], now: SweepPlan) -> list[str]:
    """What a launch sets differently from the one that wrote a sweep directory, where
    that would put other configurations' jobs beside the finished ones (values may be
    added to a swept key, and a key may become swept)."""
    old_fixed: dict[str, str] = dict(before.get("fixed") or {})
    old_swept = set(before.get("swept") or [])
    out = []
    for key, value in old_fixed.items():
        if key in now.fixed and now.fixed[key] != value:
            out.append(f"{key}={value} there, {key}={now.fixed[key]} now")
        elif key not in now.fixed and key not in now.swept:
            out.append(f"{key}={value} there, not given now")
    for key, value in now.fixed.items():
        if key not in old_fixed and key not in old_swept:
            out.append(f"{key}={value} now, not given there")
    return out


def start(config: DictConfig) -> SweepPlan | None:
    """Record a launch in ``sweep.json`` at the sweep root (before any job starts), after
    checking that the directory holds no other sweep's jobs."""
    global CURRENT
    sweep_dir = CURRENT = Path(str(config.hydra.sweep.dir))
    now = plan(config)
    if now is None:
        return None
    before = read_json(sweep_dir / SWEEP_RECORD)
    if before is None and any(p.name.isdigit() and p.is_dir() for p in sweep_dir.iterdir()):
        raise ConfigError(
            f"hydra.sweep.dir={sweep_dir} holds jobs named by number (a sweep written before "
            "jobs were named by their configuration), which this sweep cannot match to its "
            "jobs: run into a new directory (drop hydra.sweep.dir); anomaly-bench-report "
            "still summarises the old one."
        )
    conflicts = _conflicts(before, now) if before is not None else []
    if conflicts:
        raise ConfigError(
            f"hydra.sweep.dir={sweep_dir} holds the jobs of another sweep ("
            + some(conflicts, 4)
            + "). A sweep re-run into its directory reuses its finished jobs when its fixed "
            "settings are the same (values may be added to the swept keys): give the same "
            "settings, or run into a new directory (drop hydra.sweep.dir)."
        )
    _write_json(sweep_dir / SWEEP_RECORD, {
        "id": uuid.uuid4().hex, "jobs": now.jobs, "fixed": now.fixed, "swept": now.swept,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return now


# ----------------------------------------------------------------------------- one job
def _error_text(exc: BaseException) -> tuple[str, int]:
    """The one-paragraph message of a failed job and the exit code it stands for."""
    if isinstance(exc, AnomalyBenchError):
        return str(exc), exc.exit_code
    if isinstance(exc, OSError):
        return describe(exc), 2
    return f"{type(exc).__name__}: {exc}", 1


def _previous(record: Mapping[str, Any] | None) -> str | None:
    """What a job's earlier record says will happen now, or None for a new job."""
    if record is None:
        return None
    status = record.get("status")
    if status in ("finished", "reused"):
        return "finished before: its categories are checked against their rows and reused"
    if status == "failed":
        return f"failed before ({(record.get('error') or {}).get('message', '')}): rerun"
    return "did not finish before (stopped or killed): rerun, its finished categories kept"


def run_job(job_dir: Path, sweep_dir: Path, num: int, overrides: Sequence[str],
            work: Callable[[], bool]) -> None:
    """Run one job of a sweep: ``work()`` (True when every category was reused), its
    record kept in ``job.json`` from start to end.

    An error is recorded with its message and logged, and the job ends normally so that
    the sweep goes on; Ctrl-C and SIGTERM are recorded and passed on. The last job of the
    launch to end writes the sweep summary.
    """
    job_dir, sweep_dir = Path(job_dir), Path(sweep_dir)
    path = job_dir / JOB_RECORD
    before = read_json(path)
    sweep_id = (read_json(sweep_dir / SWEEP_RECORD) or {}).get("id")
    record: dict[str, Any] = {
        "num": num, "overrides": list(overrides), "sweep": sweep_id, "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID")),
        "runs": int((before or {}).get("runs", 0)) + 1}
    same = (before or {}).get("sweep") == sweep_id and sweep_id is not None \
        and before.get("num") != num  # type: ignore[union-attr]
    if same:  # two jobs of this sweep with one configuration (e.g. a repeated value)
        record["num"] = before["num"]  # type: ignore[index]
        record["also"] = sorted({*before.get("also", []), num})  # type: ignore[union-attr]
        log.info("job %d has the configuration of job %s of this sweep (%s): its results "
                 "stand for both", num, before["num"], job_dir.name)  # type: ignore[index]
    said = _previous(before)
    if said:
        log.info("job %d (%s): %s", num, job_dir.name, said)
    _write_json(path, record)
    try:
        reused = work()
    except KeyboardInterrupt:
        _write_json(path, {**record, "status": "interrupted"})
        raise
    except Exception as exc:
        message, code = _error_text(exc)
        log.error("job %d (%s) failed: %s", num, " ".join(overrides), message)
        if code == 1:
            log.error("%s", traceback.format_exc())
        _write_json(path, {**record, "status": "failed", "ended": time.strftime(
            "%Y-%m-%dT%H:%M:%S"), "error": {"message": message, "exit_code": code,
                                            "type": type(exc).__name__}})
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
    else:
        _write_json(path, {**record, "status": "reused" if reused else "finished",
                           "ended": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if sweep_id is not None:
        summarise_if_done(sweep_dir)


# ----------------------------------------------------------------------------- the launch
@dataclass
class Outcome:
    """What the jobs of the current launch did."""

    jobs: list[list[str]]
    records: dict[int, tuple[Path, dict[str, Any]]]

    def status(self, num: int) -> str:
        return self.records[num][1].get("status", "running") if num in self.records \
            else "missing"

    def with_status(self, *statuses: str) -> list[int]:
        return [n for n in range(len(self.jobs)) if self.status(n) in statuses]

    @property
    def done(self) -> bool:
        return all(self.status(n) in ENDED for n in range(len(self.jobs)))


def outcome(sweep_dir: Path) -> Outcome | None:
    """The current launch's jobs and their records (None without a launch manifest)."""
    sweep = read_json(Path(sweep_dir) / SWEEP_RECORD)
    if sweep is None or not isinstance(sweep.get("jobs"), list):
        return None
    records = {}
    for path in job_dirs(Path(sweep_dir)):
        record = read_json(path / JOB_RECORD)
        if record and record.get("sweep") == sweep["id"] and isinstance(record.get("num"), int):
            for n in [record["num"], *record.get("also", [])]:
                records[n] = (path, record)
    return Outcome(sweep["jobs"], records)


def _stamp(sweep_dir: Path) -> str:
    """Digest of every job record of the sweep: the summary is current while it holds."""
    digest = hashlib.sha256()
    for path in job_dirs(sweep_dir):
        digest.update(path.name.encode())
        try:
            digest.update((path / JOB_RECORD).read_bytes())
        except OSError:
            pass
    return digest.hexdigest()


STAMP = ".summary.stamp"


def summarise(sweep_dir: Path, force: bool = False) -> tuple[Path, Path] | None:
    """Write the sweep summary unless it is current (same job records); under a lock, so
    two jobs ending together write it once. Returns its files, None when it was current."""
    from anomaly_bench.report.results import locked
    from anomaly_bench.report.summary import write_summary

    sweep_dir = Path(sweep_dir)
    with locked(sweep_dir / "summary.md"):
        stamp = _stamp(sweep_dir)
        stamp_path = sweep_dir / STAMP
        if not force and (sweep_dir / "summary.md").is_file() and stamp_path.is_file() \
                and stamp_path.read_text() == stamp:
            return None
        files = write_summary(sweep_dir)
        with atomic_open(stamp_path, "w") as fh:
            fh.write(stamp)
        return files


def summarise_if_done(sweep_dir: Path) -> None:
    """Write the summary when every job of the current launch has ended."""
    state = outcome(sweep_dir)
    if state is None or not state.done:
        return
    try:
        files = summarise(sweep_dir)
    except (AnomalyBenchError, OSError) as exc:
        log.warning("no sweep summary: %s", exc if isinstance(exc, AnomalyBenchError)
                    else describe(exc))
        return
    if files is not None:
        log.info("last job of the sweep: summary in %s, %s", *files)


def report(state: Outcome) -> tuple[str, str | None, int]:
    """(a line counting the launch's jobs by what they did, the paragraph listing the
    failed and missing ones or None, the sweep's exit code)."""
    counts = {s: state.with_status(s) for s in ("finished", "reused", "failed")}
    other = [n for n in range(len(state.jobs)) if state.status(n) not in ENDED]
    line = (f"{len(state.jobs)} jobs: {len(counts['finished'])} ran, {len(counts['reused'])} "
            f"reused (finished before), {len(counts['failed'])} failed"
            + (f", {len(other)} did not end" if other else ""))
    if counts["reused"]:
        line += "; reused: " + ", ".join(_name(state, n) for n in counts["reused"][:12]) + (
            ", ..." if len(counts["reused"]) > 12 else "")
    bad = counts["failed"] + other
    if not bad:
        return line, None, 0
    parts = []
    for n in bad[:10]:
        where, record = state.records.get(n, (None, {}))
        why = (record.get("error") or {}).get("message") if record else None
        why = why or ("it did not report an end (killed, or still running)" if record
                      else "it never started or never reported")
        parts.append(f"job {n} ({' '.join(state.jobs[n])}"
                     + (f"; {where}" if where is not None else "") + f"): {why}")
    codes = {(state.records[n][1].get("error") or {}).get("exit_code", 1)
             for n in counts["failed"]} | ({1} if other else set())
    text = (f"{len(bad)} of {len(state.jobs)} jobs of the sweep did not finish: "
            + " | ".join(parts) + (f" | and {len(bad) - 10} more" if len(bad) > 10 else "")
            + ". Each failed job's error is in its job.json and in summary.md; running the "
            "same command with hydra.sweep.dir=<this sweep directory> reuses the finished "
            "jobs and runs the others again.")
    return line, text, 2 if codes == {2} else 1


def _name(state: Outcome, n: int) -> str:
    where = state.records.get(n, (None, {}))[0]
    return f"{n} ({where.name})" if where is not None else str(n)
