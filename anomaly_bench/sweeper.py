"""Hydra's basic sweeper, with each job's configuration derived instead of recomposed.

Hydra composes every job of a multirun from the whole config tree, twice: once when the
sweeper checks a batch (a bad job stops the sweep before any job runs) and again when
the launcher runs the job. Composing this project's tree (a dozen config groups, shared
base files, an experiment preset) takes 70 to 180 ms, which in a 72-job layer sweep is a
fixed cost comparable to a job's own work.

The jobs of a sweep differ only in the swept values. :class:`JobConfigs` (the config
loader the sweeper hands to its launcher) composes the first job as Hydra does and keeps
it, serialised; a later job whose overrides differ from it only in the scalar value of
plain config keys (no config group, no ``hydra`` key, no ``+``/``~`` override) is that
configuration with those values set, as Hydra sets command-line overrides after
composing, and with Hydra's record of the job's overrides (``hydra.overrides.task``,
``hydra.job.override_dirname``) rewritten. A value override cannot change what the
defaults list composes (Hydra interpolates only group choices there), so the result is
the configuration Hydra composes (a test compares them); anything else is composed by
Hydra. A job then costs one deserialisation (about 2 ms) instead of two compositions.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra._internal.config_loader_impl import get_overrides_dirname
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.types import HydraContext
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

_SCALARS = (int, float, str, bool, type(None))


@dataclass(frozen=True)
class _Template:
    """One job's composed configuration (pickled, never modified) and its overrides."""

    master: tuple[str, ...]  # the master config's hydra overrides and config name
    overrides: tuple[Override, ...]
    config: bytes


class JobConfigs:
    """A Hydra config loader that derives sweep jobs' configurations from one composed job.

    Every other method is Hydra's loader's own. Travels with the launcher into the job
    processes of joblib and submitit, template included.
    """

    def __init__(self, loader: Any) -> None:
        self._loader = loader
        self._template: _Template | None = None
        self._parser = OverridesParser.create()
        self._parsed: dict[str, Override] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def __getstate__(self) -> dict[str, Any]:
        return {"_loader": self._loader, "_template": self._template}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._parser = OverridesParser.create()
        self._parsed = {}

    def load_sweep_config(self, master_config: DictConfig,
                          sweep_overrides: list[str]) -> DictConfig:
        """The job's configuration: derived from the kept job when only values differ,
        else composed by Hydra (and kept)."""
        master = _master_key(master_config)
        parsed = tuple(map(self._parse, [*map(str, master_config.hydra.overrides.hydra),
                                         *sweep_overrides]))
        if self._template is not None and self._template.master == master:
            derived = _derive(self._template, parsed, master_config)
            if derived is not None:
                return derived
        config = self._loader.load_sweep_config(master_config, list(sweep_overrides))
        self._template = _Template(master, parsed, pickle.dumps(config))
        return config

    def _parse(self, line: str) -> Override:
        """One override, parsed once per sweep: the jobs share all but their swept values,
        and Hydra's grammar takes about half a millisecond per override."""
        o = self._parsed.get(line)
        if o is None:
            o = self._parsed[line] = self._parser.parse_overrides([line])[0]
        return o


def _master_key(master_config: DictConfig) -> tuple[str, ...]:
    return (str(master_config.hydra.job.config_name),
            *map(str, master_config.hydra.overrides.hydra))


def _is_value(o: Override, choices: Any) -> bool:
    """A plain ``key=scalar`` override of a config key (not a group, not Hydra's)."""
    return (o.type == OverrideType.CHANGE and o.package is None and not o.is_hydra_override()
            and o.key_or_group not in choices and not o.is_sweep_override()
            and isinstance(o.value(), _SCALARS))


def _derive(template: _Template, parsed: Sequence[Override],
            master_config: DictConfig) -> DictConfig | None:
    """The template's configuration with ``parsed``'s values, or None when a difference
    is more than the value of a plain key."""
    kept = template.overrides
    if len(kept) != len(parsed):
        return None
    config = pickle.loads(template.config)
    choices = config.hydra.runtime.choices
    changed = []
    for old, new in zip(kept, parsed, strict=True):
        if old.input_line == new.input_line:
            continue
        if old.key_or_group != new.key_or_group or not (
                _is_value(old, choices) and _is_value(new, choices)):
            return None
        changed.append(new)
    keys = [o.key_or_group for o in parsed if not o.is_hydra_override()]
    if len(set(keys)) != len(keys):  # a key set twice: the order of all overrides matters
        return None
    try:
        for o in changed:
            current = OmegaConf.select(config, o.key_or_group, throw_on_missing=False)
            if isinstance(current, DictConfig | ListConfig | dict | list):
                return None
            OmegaConf.update(config, o.key_or_group, o.value(), merge=True)
    except Exception:  # whatever Hydra would report: let it compose and say so
        return None
    task = [o for o in parsed if not o.is_hydra_override()]
    job = config.hydra.job
    with open_dict(config.hydra):
        config.hydra.overrides.task = [o.input_line for o in task]
        job.override_dirname = get_overrides_dirname(
            overrides=task, kv_sep=job.config.override_dirname.kv_sep,
            item_sep=job.config.override_dirname.item_sep,
            exclude_keys=list(job.config.override_dirname.exclude_keys))
    OmegaConf.copy_cache(from_config=master_config, to_config=config)
    return config


def setup_context(hydra_context: HydraContext) -> HydraContext:
    """The context a sweeper hands to its launcher: Hydra's, with :class:`JobConfigs`."""
    return HydraContext(config_loader=JobConfigs(hydra_context.config_loader),
                        callbacks=hydra_context.callbacks)


def register() -> None:
    """Register the sweeper of ``conf/hydra/sweeper/derived.yaml`` with Hydra (idempotent).

    Hydra finds plugins by listing its ``hydra_plugins`` namespace, which misses a package
    installed in editable mode; its first scan also re-executes the plugin modules, so the
    class is imported after it. Jobs in other processes receive the registry from the
    submitting process."""
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()
    from hydra_plugins.anomaly_bench_sweeper import Sweeper

    plugins.register(Sweeper)
