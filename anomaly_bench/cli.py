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
from omegaconf import DictConfig

from anomaly_bench.configs import config_dir, friendly_overrides
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


def _stopped(exc: KeyboardInterrupt, run_dir: Path | None) -> NoReturn:
    """One line for Ctrl-C (exit 130) or SIGTERM (exit 143), saying how to resume."""
    what, code = ("terminated (SIGTERM)", 143) if isinstance(exc, Terminated) \
        else ("interrupted", 130)
    where = (f"; finished categories are in {run_dir}/results.csv, and the same command with "
             f"hydra.run.dir={run_dir} resumes." if run_dir is not None else ".")
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
    from anomaly_bench.runner import Runner

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    _ignore_file_size_signal()  # also in a launcher's job process (joblib, submitit)
    try:
        Runner(cfg, run_dir, list(hc.overrides.task), sweep=hc.mode == RunMode.MULTIRUN).run()
    except (AnomalyBenchError, OSError) as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if isinstance(exc, OSError):  # a write the run could not do, or the filesystem's own
            message = describe(exc) if isinstance(exc, WriteError) \
                else f"{exc.filename or 'a file'}: {exc.strerror or exc}"
            _fail(f"{message}. Categories finished before are in {run_dir}/results.csv.")
        log.error("%s", exc)
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt as exc:
        _stopped(exc, run_dir)


def _ignore_file_size_signal() -> None:
    """Ignore SIGXFSZ: a write past the file-size limit then fails with EFBIG (reported)
    instead of killing the process (only the main thread may set a handler)."""
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def main() -> None:
    """Console-script entry point."""
    sys.argv[1:] = friendly_overrides(sys.argv[1:])
    signal.signal(signal.SIGTERM, _on_sigterm)
    _ignore_file_size_signal()
    # a log line that cannot be written (the disk the error is about) stays silent rather
    # than burying the one-paragraph error under logging's own tracebacks
    logging.raiseExceptions = False
    try:
        hydra.main(version_base="1.3", config_path=str(config_dir()),
                   config_name="config")(_task)()
    except KeyboardInterrupt as exc:  # before or after the task (composing, summaries)
        _stopped(exc, None)


if __name__ == "__main__":
    main()
