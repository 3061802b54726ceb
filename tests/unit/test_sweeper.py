"""Sweep jobs' configurations derived from one composed job equal Hydra's compositions."""

from __future__ import annotations

import pickle

import pytest
from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

from anomaly_bench import sweeper
from anomaly_bench.configs import config_dir
from anomaly_bench.sweeper import JobConfigs


@pytest.fixture
def hydra_loader():
    sweeper.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        yield GlobalHydra.instance().hydra


def jobs(arguments: list[str]) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper expands ``arguments``."""
    parsed = OverridesParser.create().parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def plain(cfg) -> tuple:
    return (OmegaConf.to_container(cfg, resolve=False), OmegaConf.is_struct(cfg),
            OmegaConf.is_readonly(cfg.hydra))


SWEEPS = {
    "layer blocks (ints)": ["experiment=padim_screw_layers", "layers.layer1=0,1,2",
                            "layers.layer3=0,5", "backbone.pretrained=false"],
    "strings, floats, null": ["dataset.category=a,'b c'", "method.reg=0.01,0.5",
                              "backbone.weights=null,/tmp/w.pth", "seed=3"],
    "a group and a value": ["method=padim,patchcore", "seed=0,1"],
}


@pytest.mark.parametrize("sweep", list(SWEEPS))
def test_derived_configs_equal_hydras(hydra_loader, sweep):
    args = [*SWEEPS[sweep], "hydra.sweep.dir=/tmp/never-written"]
    master = hydra_loader.compose_config("config", [a for a in args if "," not in a],
                                         run_mode=RunMode.MULTIRUN,
                                         with_log_configuration=False)
    loader = hydra_loader.config_loader
    configs = JobConfigs(loader)
    composed = []
    original = loader.load_sweep_config

    def counting(master_config, overrides):
        composed.append(overrides)
        return original(master_config, overrides)

    configs._loader = type("Counting", (), {"load_sweep_config": staticmethod(counting)})()
    all_jobs = jobs([a for a in args if a.startswith(("hydra.",)) is False])
    assert len(all_jobs) > 2
    for overrides in all_jobs:
        want = original(master, overrides)
        got = configs.load_sweep_config(master, overrides)
        assert plain(got) == plain(want), overrides
        assert got.hydra.overrides.task == want.hydra.overrides.task
        assert got.hydra.job.override_dirname == want.hydra.job.override_dirname
    if sweep == "a group and a value":  # a new method is composed, its seeds derived
        assert len(composed) == 2
    else:
        assert len(composed) == 1


def test_job_configs_travel_with_their_template(hydra_loader):
    """Pickled into a joblib or submitit job process, the loader still derives."""
    master = hydra_loader.compose_config("config", ["backbone.pretrained=false"],
                                         run_mode=RunMode.MULTIRUN,
                                         with_log_configuration=False)
    configs = JobConfigs(hydra_loader.config_loader)
    first = configs.load_sweep_config(master, ["seed=0", "backbone.pretrained=false"])
    moved = pickle.loads(pickle.dumps(configs))
    moved._loader = None  # a composition would fail now
    second = moved.load_sweep_config(master, ["seed=1", "backbone.pretrained=false"])
    assert second.seed == 1 and first.seed == 0
    assert second.hydra.overrides.task == ["seed=1", "backbone.pretrained=false"]


def test_hydra_instantiates_the_configured_sweeper(hydra_loader):
    """Hydra takes sweepers only from its plugin namespace; ours sets up JobConfigs."""
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext

    master = hydra_loader.compose_config("config", ["seed=0,1"], run_mode=RunMode.MULTIRUN,
                                         with_log_configuration=False)
    sweeper = Plugins.instance().instantiate_sweeper(
        hydra_context=HydraContext(config_loader=hydra_loader.config_loader, callbacks=None),
        task_function=lambda cfg: None, config=master)
    assert isinstance(sweeper.hydra_context.config_loader, JobConfigs)
    assert isinstance(sweeper.launcher.hydra_context.config_loader, JobConfigs)
