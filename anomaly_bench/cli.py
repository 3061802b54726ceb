"""The ``anomaly-bench`` command: a Hydra application around :class:`~anomaly_bench.runner.Runner`.

Errors caused by input (paths, layouts, config values, weights) are printed as one
paragraph with exit code 2 and no traceback; ``HYDRA_FULL_ERROR=1`` shows the traceback.
Ctrl-C stops with one line (exit 130); the rows already written stay, and running the
same command into the same run directory resumes.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from anomaly_bench.configs import config_dir, friendly_overrides
from anomaly_bench.errors import AnomalyBenchError

log = logging.getLogger("anomaly_bench")


def _task(cfg: DictConfig) -> None:
    from anomaly_bench.runner import Runner

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        Runner(cfg, run_dir, list(hc.overrides.task), sweep=hc.mode == RunMode.MULTIRUN).run()
    except AnomalyBenchError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s", exc)
        print(f"anomaly-bench: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print(f"anomaly-bench: interrupted; finished categories are in {run_dir}/results.csv, "
              f"and the same command with hydra.run.dir={run_dir} resumes.", file=sys.stderr)
        sys.exit(130)


def main() -> None:
    """Console-script entry point."""
    sys.argv[1:] = friendly_overrides(sys.argv[1:])
    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")(_task)()


if __name__ == "__main__":
    main()
