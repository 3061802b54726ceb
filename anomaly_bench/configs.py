"""The config root ``conf/`` and its option files read outside a Hydra run.

The Hydra app composes ``conf/`` for every run. Some code needs one option file alone:
the method's defaults, which fill keys a config leaves out (a checkpoint or run
directory written before a key existed was fitted with that key's default). An option
file may start from shared keys (``conf/base/*.yaml``) through its defaults list, as
Hydra composes it: entries ``/path@_here_`` merge that file's keys, ``_self_`` the file's
own (last when not listed); entries that choose other groups add no key here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def config_dir() -> Path:
    """The Hydra config root: ``conf/`` of a checkout or the installed ``anomaly_bench.conf``."""
    return Path(str(resources.files("anomaly_bench.conf")))


@contextmanager
def composer() -> Iterator[Callable[[Sequence[str]], DictConfig]]:
    """A function composing the app's configuration (``hydra`` node included) from
    overrides, as a run would (Hydra's compose API; no sweep values)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        yield lambda overrides: compose("config", overrides=list(overrides),
                                        return_hydra_config=True)


def _load(relative: str) -> dict[str, Any]:
    node = OmegaConf.load(config_dir() / f"{relative}.yaml")
    values: dict[str, Any] = OmegaConf.to_container(node, resolve=False)  # type: ignore[assignment]
    entries = values.pop("defaults", None) or []
    if "_self_" not in entries:
        entries = [*entries, "_self_"]
    merged: dict[str, Any] = {}
    for entry in entries:
        if entry == "_self_":
            merged.update(values)
        elif isinstance(entry, str) and entry.startswith("/") and entry.endswith("@_here_"):
            merged.update(_load(entry[1:-len("@_here_")]))
    return merged


@cache
def _option(group: str, name: str) -> tuple[tuple[str, Any], ...]:
    return tuple(_load(f"{group}/{name}").items())


def option_values(group: str, name: str) -> dict[str, Any]:
    """The keys of ``conf/<group>/<name>.yaml`` (its shared keys included), unresolved."""
    return dict(_option(group, name))
