"""The Hydra launchers a sweep can use, and the checks made before any job is submitted.

Jobs run through Hydra's launcher plugins (``pip install ".[cluster]"``): the submitit
launcher for SLURM (``hydra/launcher=slurm``, this project's preset over the plugin's
``submitit_slurm``) and for local processes (``submitit_local``), and the joblib launcher
for parallel local jobs (``hydra/launcher=parallel`` over the plugin's ``joblib``).

What would otherwise end in a plugin's traceback is one paragraph here (exit 2): a
launcher whose plugin is not installed, a launcher key the plugin does not have, SLURM
asked for on a machine without it, a SLURM partition that is not set or does not exist.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from anomaly_bench.errors import ConfigError

#: Launcher choice -> the plugin package it needs.
PLUGINS = {
    "slurm": "hydra_plugins.hydra_submitit_launcher",
    "submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher",
    "parallel": "hydra_plugins.hydra_joblib_launcher",
    "joblib": "hydra_plugins.hydra_joblib_launcher",
}
INSTALL = 'pip install "anomaly-bench[cluster]" (from a checkout: pip install -e ".[cluster]")'


def _launcher_choice(overrides: Sequence[str]) -> str | None:
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.lstrip("+~") == "hydra/launcher":
            return value
    return None


def check_overrides(overrides: Sequence[str], compose: Any) -> None:
    """Check the launcher asked for on the command line before Hydra composes anything.

    ``compose(overrides)`` composes the configuration with the given overrides (raising
    on an unknown key); it is called with only the launcher overrides when there are any.
    """
    choice = _launcher_choice(overrides)
    if choice in PLUGINS and not _installed(PLUGINS[choice]):
        raise ConfigError(
            f"hydra/launcher={choice} needs Hydra's "
            f"{'submitit' if 'submitit' in PLUGINS[choice] else 'joblib'} launcher plugin, "
            f"which is not installed: {INSTALL}."
        )
    mine = [o for o in overrides if o.lstrip("+~").startswith(("hydra/launcher=",
                                                                  "hydra.launcher."))]
    if not mine:
        return
    try:
        compose(mine)
    except Exception as exc:  # Hydra's composition error
        chosen = [o for o in mine if o.lstrip("+~").startswith("hydra/launcher=")]
        known = _known_keys(compose, chosen)
        keys = [o.split("=", 1)[0].lstrip("+~") for o in mine
                if o.lstrip("+~").startswith("hydra.launcher.")]
        unknown = [k for k in keys if known is not None and k.split(".")[2] not in known]
        name = choice or "basic (the default)"
        if unknown:
            raise ConfigError(
                f"{', '.join(unknown)} is not a setting of hydra/launcher={name}; its "
                f"settings are hydra.launcher.{{{','.join(known or ['none'])}}}: correct the key "
                "(or choose another launcher: hydra/launcher=slurm|submitit_local|parallel)."
            ) from None
        text = " ".join(str(exc).split()).split(" Config search path")[0]
        raise ConfigError(
            f"the launcher settings {' '.join(mine)} cannot be used ({text}); launchers: "
            "hydra/launcher=basic|parallel|joblib|slurm|submitit_slurm|submitit_local."
        ) from None


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:
        return False


def _known_keys(compose: Any, choice: list[str]) -> list[str] | None:
    try:
        cfg = compose(choice)
    except Exception:
        return None
    return sorted(k for k in cfg.hydra.launcher if not str(k).startswith("_"))


def check_launcher(launcher: Mapping[str, Any], n_jobs: int | None = None) -> None:
    """Refuse a SLURM launcher on a machine without SLURM or without a usable partition.

    ``launcher`` is the resolved ``hydra.launcher`` config. Other launchers pass.
    """
    target = str(launcher.get("_target_", ""))
    if not target.endswith("SlurmLauncher"):
        return
    if shutil.which("srun") is None or shutil.which("sbatch") is None:
        raise ConfigError(
            "the SLURM launcher (hydra/launcher=slurm or submitit_slurm) submits the sweep to "
            "SLURM, but this machine has no SLURM "
            "(srun and sbatch are not on PATH): run the command on a login node of the "
            "cluster, or run the sweep here with hydra/launcher=parallel (local processes), "
            "hydra/launcher=submitit_local, or without hydra/launcher (one job after another)."
        )
    partition = launcher.get("partition")
    if not partition:
        raise ConfigError(
            "the SLURM launcher needs a partition: set hydra.launcher.partition=NAME (sinfo "
            "lists them), the environment variable ANOMALY_BENCH_SLURM_PARTITION, or "
            "hydra.launcher.partition in conf/local/default.yaml (see conf/local/example.yaml)."
        )
    known = partitions()
    if known is not None and str(partition) not in known:
        raise ConfigError(
            f"hydra.launcher.partition={partition} is not a partition of this cluster "
            f"(sinfo lists: {', '.join(sorted(known)) or 'none'}): set "
            "hydra.launcher.partition to one of them."
        )


def partitions() -> set[str] | None:
    """The partitions ``sinfo`` lists (None when sinfo is missing or fails)."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {line.strip().rstrip("*") for line in out.splitlines() if line.strip()}
