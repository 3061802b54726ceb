"""The sweeper of ``conf/hydra/sweeper/derived.yaml``: Hydra's basic sweeper whose jobs'
configurations come from :class:`anomaly_bench.sweeper.JobConfigs`.

Hydra instantiates sweepers only from classes defined in its ``hydra_plugins`` namespace.
"""

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from anomaly_bench.sweeper import setup_context


class Sweeper(BasicSweeper):
    """Hydra's basic sweeper (same ``params`` and ``max_batch_size``) whose check of a
    batch and whose launcher share one :class:`~anomaly_bench.sweeper.JobConfigs`."""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        super().setup(hydra_context=setup_context(hydra_context), task_function=task_function,
                      config=config)
