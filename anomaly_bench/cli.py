"""The ``anomaly-bench`` command: a Hydra application around :class:`~anomaly_bench.runner.Runner`.

Errors caused by input (paths, layouts, config values, weights) and failures to write (a
full disk, a file-size limit, a read-only filesystem, a file where a folder goes, a
symbolic link where the run writes) are printed as one paragraph with exit code 2 and no
traceback; ``HYDRA_FULL_ERROR=1`` shows the traceback. That includes the run directory
itself, which :class:`RunDirectory` creates before Hydra writes into it.

Ctrl-C (exit 130) and SIGTERM (exit 143: what SLURM sends before it kills a job) stop with
one line; the rows already written stay, and running the same command into the same run
directory resumes. SIGUSR1 and SIGUSR2 are left alone: a cluster launcher or job script
requeues with them. SIGXFSZ is ignored, so a file over the size limit (``ulimit -f``)
fails its write (EFBIG, reported as above) instead of killing the process.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from anomaly_bench import (
    sweep,  # registers ${job_dir:} in every process a job runs in
    sweeper,
)
from anomaly_bench.allocator import reuse_freed_memory
from anomaly_bench.configs import composer, config_dir, friendly_overrides
from anomaly_bench.errors import AnomalyBenchError
from anomaly_bench.fsutil import WriteError, describe, refuse_link, write_error

log = logging.getLogger("anomaly_bench")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, as Ctrl-C raises KeyboardInterrupt."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def _fail(message: str, code: int = 2) -> NoReturn:
    """Print ``message`` as the one paragraph of a failed run and exit with ``code``."""
    print(f"anomaly-bench: error: {message}", file=sys.stderr)
    sys.exit(code)


def _stopped(exc: KeyboardInterrupt, run_dir: Path | None,
             sweep_dir: Path | None = None) -> NoReturn:
    """One line for Ctrl-C (exit 130) or SIGTERM (exit 143), saying how to resume."""
    what, code = ("terminated (SIGTERM)", 143) if isinstance(exc, Terminated) \
        else ("interrupted", 130)
    if sweep_dir is not None:
        where = (f"; finished jobs and categories stay in {sweep_dir}, and the same command "
                 f"with hydra.sweep.dir={sweep_dir} reuses them and runs the rest.")
    elif run_dir is not None:
        where = (f"; finished categories are in {run_dir}/results.csv, and the same command "
                 f"with hydra.run.dir={run_dir} resumes.")
    else:
        where = "."
    print(f"anomaly-bench: {what}{where}", file=sys.stderr)
    sys.exit(code)


class RunDirectory(Callback):
    """Creates the run (or sweep) directory before Hydra does and checks that it takes files.

    Hydra creates ``hydra.run.dir`` and writes its ``.hydra/`` files and the job log into
    it before the task starts, where an error ends in its traceback; here a directory that
    cannot be created or written (under a file, on a read-only or full filesystem) and a
    symbolic link where Hydra is about to write stop the run with one paragraph (exit 2).
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        hc = config.hydra
        names = [f"{hc.job.name}.log"]
        if hc.output_subdir is not None:
            names += [str(hc.output_subdir)] + [f"{hc.output_subdir}/{n}" for n in
                                                ("config.yaml", "hydra.yaml", "overrides.yaml")]
        _prepare(Path(str(hc.run.dir)), names, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from anomaly_bench.launchers import check_launcher

        try:
            check_launcher(OmegaConf.to_container(config.hydra.launcher, resolve=True))
        except AnomalyBenchError as exc:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            _fail(str(exc), exc.exit_code)
        _prepare(Path(str(config.hydra.sweep.dir)), ["multirun.yaml"], "hydra.sweep.dir")


def _prepare(folder: Path, names: list[str], key: str) -> None:
    """Create ``folder``, refuse links among ``names`` in it and write a probe file there."""
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for name in names:
                refuse_link(folder / name)
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".anomaly-bench-probe.")
            try:
                os.write(fd, b"probe")
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as exc:
            raise write_error(folder, exc) from None
    except WriteError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _fail(f"the run directory {key}={folder} cannot be used: {describe(exc)}.")


def _task(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    _ignore_file_size_signal()  # also in a launcher's job process (joblib, submitit)
    reuse_freed_memory()
    if hc.mode != RunMode.MULTIRUN:
        _run(cfg, run_dir, list(hc.overrides.task), in_sweep=False)
        return
    from anomaly_bench import memo_budget

    n_jobs = len((sweep.read_json(Path(hc.sweep.dir) / sweep.SWEEP_RECORD) or {}).get("jobs")
                 or [None])
    memo_budget.set_workers(memo_budget.workers_of(
        OmegaConf.to_container(hc.launcher, resolve=True), n_jobs))  # type: ignore[arg-type]
    try:  # a failing job is recorded and the sweep goes on (anomaly_bench/sweep.py)
        sweep.run_job(run_dir, Path(hc.sweep.dir), int(hc.job.num), list(hc.overrides.task),
                      lambda: _run(cfg, run_dir, list(hc.overrides.task), in_sweep=True))
    except KeyboardInterrupt as exc:
        _stopped(exc, run_dir, Path(hc.sweep.dir))


def _run(cfg: DictConfig, run_dir: Path, overrides: list[str], in_sweep: bool) -> bool:
    """Run one configuration into ``run_dir``; True when every category was reused.

    In a single run an input or write error is one paragraph (exit 2); in a sweep it is
    raised for the job's record."""
    from anomaly_bench.runner import Runner

    try:
        runner = Runner(cfg, run_dir, overrides, sweep=in_sweep)
        rows = runner.run()
        return bool(runner.reused) and not rows
    except (AnomalyBenchError, OSError) as exc:
        if in_sweep or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if isinstance(exc, OSError):  # a write the run could not do, or the filesystem's own
            message = describe(exc) if isinstance(exc, WriteError) \
                else f"{exc.filename or 'a file'}: {exc.strerror or exc}"
            _fail(f"{message}. Categories finished before are in {run_dir}/results.csv.")
        log.error("%s", exc)
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt as exc:
        if in_sweep:
            raise
        _stopped(exc, run_dir)


def _ignore_file_size_signal() -> None:
    """Ignore SIGXFSZ: a write past the file-size limit then fails with EFBIG (reported)
    instead of killing the process (only the main thread may set a handler)."""
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _compose(overrides: list[str]) -> DictConfig:
    """The configuration composed with ``overrides`` (Hydra's compose API, hydra node kept)."""
    with composer() as compose:
        return compose(overrides)


def _check_launcher_overrides(argv: list[str]) -> None:
    """A launcher asked for on the command line: its plugin installed, its keys known."""
    from anomaly_bench.launchers import check_overrides

    try:
        check_overrides([a for a in argv if not a.startswith("-")], _compose)
    except AnomalyBenchError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _fail(str(exc), exc.exit_code)


def main() -> None:
    """Console-script entry point."""
    reuse_freed_memory()
    sys.argv[1:] = friendly_overrides(sys.argv[1:])
    signal.signal(signal.SIGTERM, _on_sigterm)
    _ignore_file_size_signal()
    # a log line that cannot be written (the disk the error is about) stays silent rather
    # than burying the one-paragraph error under logging's own tracebacks
    logging.raiseExceptions = False
    _check_launcher_overrides(sys.argv[1:])
    sweeper.register()
    try:
        hydra.main(version_base="1.3", config_path=str(config_dir()),
                   config_name="config")(_task)()
    except KeyboardInterrupt as exc:  # before or after the task (composing, summaries)
        _stopped(exc, None, sweep.CURRENT)
    if sweep.FAILURE is not None:  # set at the end of a sweep whose jobs did not all finish
        _fail(*sweep.FAILURE)


if __name__ == "__main__":
    main()
