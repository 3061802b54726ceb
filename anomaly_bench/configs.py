"""The config root ``conf/`` and its option files read outside a Hydra run.

The Hydra app composes ``conf/`` for every run. Some code needs one option file alone:
the method's defaults, which fill keys a config leaves out (a checkpoint or run
directory written before a key existed was fitted with that key's default). An option
file may start from shared keys (``conf/base/*.yaml``) through its defaults list, as
Hydra composes it: entries ``/path@_here_`` merge that file's keys, ``/group@key: option``
put that option's keys under ``key`` (a method's own backbone, ``method.teacher``),
``_self_`` the file's own (last when not listed, merged key by key); entries that choose
other groups add no key here.

A backbone group nested under a method is chosen on the command line as Hydra spells it,
``backbone@method.teacher=resnet18``; :func:`friendly_overrides` also accepts the plain
``method.teacher=resnet18``.
"""

from __future__ import annotations

import copy
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
            merged = _merge(merged, values)
        elif isinstance(entry, str) and entry.startswith("/") and entry.endswith("@_here_"):
            merged = _merge(merged, _load(entry[1:-len("@_here_")]))
        elif isinstance(entry, str) and entry.startswith("/") and "@" in entry:
            path, _, key = entry[1:].partition("@")
            merged = _merge(merged, {key: _load(path)})
        elif isinstance(entry, dict) and len(entry) == 1:
            (where, option), = entry.items()
            group, _, key = str(where).partition("@")
            if group.startswith("/") and key and not key.startswith("_") and " " not in group:
                merged = _merge(merged, {key: _load(f"{group[1:]}/{option}")})
    return merged


def _merge(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` over ``base``, nested mappings merged key by key (as Hydra merges)."""
    out = dict(base)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@cache
def backbone_roles() -> frozenset[str]:
    """Keys of any method group that are backbone groups (``/backbone@<key>`` entries in
    a ``conf/method`` file's defaults list)."""
    roles = set()
    for path in sorted((config_dir() / "method").glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        for entry in (node or {}).get("defaults", []) if isinstance(node, dict) else []:
            if isinstance(entry, dict):
                for where in entry:
                    group, _, key = str(where).partition("@")
                    if group == "/backbone" and key and not key.startswith("_"):
                        roles.add(key)
    return frozenset(roles)


def friendly_overrides(args: list[str]) -> list[str]:
    """Command-line arguments with ``method.<role>=<option>[,...]`` (a method's own
    backbone group, e.g. ``method.teacher=resnet18``) spelt as Hydra chooses a nested
    group option: ``backbone@method.<role>=...``. Everything else is left as it is."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key.startswith("method.") and key[len("method."):] in backbone_roles():
            arg = f"backbone@{key}={value}"
        out.append(arg)
    return out


def option_values(group: str, name: str) -> dict[str, Any]:
    """The keys of ``conf/<group>/<name>.yaml`` (its shared keys included), resolved as
    in a composed run: relative interpolations within the option (``${..epochs}``) and
    the top-level ``data_root`` of ``config.yaml`` (a backbone's cache folder). A copy:
    the files are read once per process (every job of a sweep asks again)."""
    path = config_dir() / group / f"{name}.yaml"
    stamp = path.stat().st_mtime_ns if path.is_file() else None
    return copy.deepcopy(_option_values(str(config_dir()), group, name, stamp))


@cache
def _option_values(root: str, group: str, name: str, stamp: int | None) -> dict[str, Any]:
    """:func:`option_values` of the files under ``root`` as they are at ``stamp``."""
    values = _load(f"{group}/{name}")
    top = OmegaConf.load(config_dir() / "config.yaml")
    root = OmegaConf.create({"data_root": top.get("data_root"), group: values})
    return OmegaConf.to_container(root, resolve=True)[group]  # type: ignore[index]
