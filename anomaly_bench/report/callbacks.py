"""Hydra callback writing ``summary.csv`` and ``summary.md`` when a multirun sweep ends.

Hydra skips ``on_multirun_end`` when a job fails or the submitting process dies; then
``python -m anomaly_bench.report.summary SWEEP_DIR`` builds the same files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("anomaly_bench")


class SweepSummary(Callback):
    """Summarise every job's results.csv at the sweep root."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from anomaly_bench.errors import AnomalyBenchError
        from anomaly_bench.report.summary import write_summary

        sweep_dir = Path(config.hydra.sweep.dir)
        try:  # table settings come from the jobs' own `summary` config (presets included)
            csv_path, md_path = write_summary(sweep_dir)
            print(md_path.read_text())
        except AnomalyBenchError as exc:
            log.warning("no sweep summary: %s", exc)
            return
        log.info("sweep summary: %s, %s", csv_path, md_path)
