"""Hydra callback: per-job feature cache report, and ``summary.csv`` / ``summary.md`` when a
multirun sweep ends.

At the start of each job it applies ``backbone.cache.max_gb`` to the cache folder and
starts counting where the job's block outputs come from; at the end of each job it logs
that count (images read from memory, from disk, and run through the backbone). At the end
of a single run that used the feature cache, and of every sweep whose jobs use it, it
tells where the cache folder is and how large it is.

Hydra skips ``on_multirun_end`` when a job fails or the submitting process dies; then
``python -m anomaly_bench.report.summary SWEEP_DIR`` builds the same files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("anomaly_bench")


def _cache_cfg(config: DictConfig) -> dict[str, Any] | None:
    """The resolved ``backbone.cache`` group when the feature cache is on, else None."""
    try:
        cache = OmegaConf.to_container(config.backbone.cache, resolve=True)
    except Exception:  # a config without that group, or one that does not resolve
        return None
    return cache if isinstance(cache, dict) and cache.get("enabled") else None


def _cache_report(config: DictConfig, roots: set[str]) -> str | None:
    """Where the feature cache folders of this run are, their size and cap, or None."""
    from anomaly_bench.backbones import cache as feature_cache

    cfg = _cache_cfg(config)
    folders = set(roots)
    if cfg is not None:
        folders.add(feature_cache._root_key(cfg["dir"]))
    if not folders:
        return None
    cap = cfg.get("max_gb") if cfg is not None else None
    lines = [f"feature cache: {feature_cache.describe(root)}" for root in sorted(folders)]
    if cap is not None:
        lines[-1] += f" (backbone.cache.max_gb={cap:g})"
    return "\n".join(lines) + "\n(anomaly-bench-cache --clear DIR empties it)"


class SweepSummary(Callback):
    """Feature cache reports per job and per run; the sweep summary at the sweep root."""

    def __init__(self) -> None:
        self._roots: set[str] = set()  # cache folders the jobs of this process used
        self._shed = 0  # the memo's shed bytes when the current job started

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Record the launch (sweep.json) after checking the sweep directory holds no other
        sweep's jobs."""
        import os

        from anomaly_bench import sweep
        from anomaly_bench.errors import AnomalyBenchError

        sweep.FAILURE = None
        try:
            sweep.start(config)
        except AnomalyBenchError as exc:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            from anomaly_bench.cli import _fail

            _fail(str(exc), exc.exit_code)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from anomaly_bench.backbones import cache as feature_cache
        from anomaly_bench.memo import MEMO

        feature_cache.reset_stats()
        self._shed = MEMO.shed_bytes
        cfg = _cache_cfg(config)
        if cfg is not None:
            feature_cache.set_max_gb(cfg["dir"], cfg.get("max_gb"))

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        from anomaly_bench.backbones import cache as feature_cache
        from anomaly_bench.memo import MEMO

        stats = feature_cache.STATS
        self._roots |= stats.roots
        if not stats.used:
            return
        text = f"feature cache: {stats.describe()}"
        shed = MEMO.shed_bytes - self._shed
        if shed:
            text += (f"; the in-process memo gave back {shed / 2**30:.2f} GiB to a host "
                     "short of memory")
        log.info("%s", text)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        from anomaly_bench.backbones import cache as feature_cache

        feature_cache.flush_writes()
        if self._roots:  # only when the run used the cache
            report = _cache_report(config, self._roots)
            if report:
                log.info("%s", report)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from anomaly_bench import sweep
        from anomaly_bench.backbones import cache as feature_cache
        from anomaly_bench.errors import AnomalyBenchError
        from anomaly_bench.fsutil import describe
        from anomaly_bench.report.summary import write_summary

        feature_cache.flush_writes()
        report = _cache_report(config, self._roots)
        sweep_dir = Path(config.hydra.sweep.dir)
        state = sweep.outcome(sweep_dir)
        try:  # table settings come from the jobs' own `summary` config (presets included)
            if state is not None:  # the last job may have written it already
                files = sweep.summarise(sweep_dir)
                csv_path, md_path = files or (sweep_dir / "summary.csv", sweep_dir / "summary.md")
            else:
                csv_path, md_path = write_summary(sweep_dir)
            print(md_path.read_text())
        except AnomalyBenchError as exc:
            log.warning("no sweep summary: %s", exc)
        except OSError as exc:
            log.warning("no sweep summary: %s", describe(exc))
        else:
            log.info("sweep summary: %s, %s", csv_path, md_path)
        if report:
            print(report)
            log.info("%s", report)
        if state is not None:
            line, failure, code = sweep.report(state)
            log.info("%s", line)
            if failure is not None:
                sweep.FAILURE = (failure, code)
