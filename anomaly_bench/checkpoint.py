"""model.pt: a fitted method, what it was fitted on, and a checksum of both.

A checkpoint is a data file (:mod:`anomaly_bench.datafile`: tensors, numbers and strings,
read with ``weights_only=True`` and verified against its SHA-256). Its description records
the method, backbone, weights, layers, resolution, dataset and category; ``stage=test``
refuses a checkpoint whose description differs from the requested run, naming both values.

The file holds only what fitting produced (a Gaussian per position, a memory bank,
trained adapters, a trained backbone such as MMR's encoder), never a frozen backbone:
``stage=test`` builds the backbone from the run's config and weights (the same weights,
checked by their tag) and reproduces the scores exactly. A PaDiM or PatchCore model of
ResNet-18 is then megabytes, not the network's 45 MB on top.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from anomaly_bench.datafile import read_data, write_data
from anomaly_bench.errors import CheckpointError
from anomaly_bench.methods import (
    NEUTRAL_BACKBONE_KEYS,
    AnomalyMethod,
    build_method,
    comparable,
    keys_at_test,
    load_fitted_state,
    method_defaults,
)
from anomaly_bench.schema import differences

#: Config groups that define a fitted model; ``stage=test`` rebuilds from these.
MODEL_KEYS = ("method", "backbone", "layers", "resolution", "alignment")
#: What a checkpoint says it was fitted on (besides the config groups).
META_KEYS = ("method", "backbone", "weights", "layers", "resolution", "dataset", "category",
             "seed")
#: Recorded when known: the categories whose images the model learned from.
OPTIONAL_META_KEYS = ("categories",)


def save(path: Path, method: AnomalyMethod, config: Mapping[str, Any],
         meta: Mapping[str, Any]) -> Path:
    """Write the fitted state; ``meta`` holds every :data:`META_KEYS` entry (and may hold
    :data:`OPTIONAL_META_KEYS`)."""
    return save_state(path, {k: v.detach().cpu() for k, v in method.fitted_state().items()},
                      config, meta)


def save_state(path: Path, state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
               meta: Mapping[str, Any]) -> Path:
    """Write a fitted state (CPU tensors named as the method's ``fitted_state``) fitted
    elsewhere, e.g. published adapters converted to this format, as :func:`save` does."""
    kept = (*META_KEYS, *(k for k in OPTIONAL_META_KEYS if k in meta))
    description = {"meta": {k: meta[k] for k in kept},
                   "config": {k: config[k] for k in MODEL_KEYS}}
    return write_data(path, "model", description, dict(state))


def locate(checkpoint: str | os.PathLike | None, category: str | None,
           n_categories: int) -> Path:
    """Find the model.pt for ``category``: a file (single category) or a run directory.

    ``category=None`` asks for the one model of a ``fit_scope=dataset`` run (``model.pt``
    at the root of its run directory).
    """
    if not checkpoint:
        raise CheckpointError(
            "stage=test needs checkpoint=PATH: a model.pt written by stage=train, or the run "
            "directory of that run (holding <category>/model.pt)."
        )
    p = Path(checkpoint).expanduser()
    if p.is_dir() and category is None:
        if (p / "model.pt").is_file():
            return p / "model.pt"
        raise CheckpointError(
            f"checkpoint={p} is a directory without model.pt; expected the run directory of "
            "a stage=train fit_scope=dataset run."
        )
    if category is None:
        n_categories = 1  # one model serves every category
    if p.is_dir():
        candidate = p / category / "model.pt"
        if candidate.is_file():
            return candidate
        raise CheckpointError(
            f"checkpoint={p} is a directory without {category}/model.pt; expected the run "
            "directory of a stage=train run on the same dataset category."
        )
    if not p.is_file():
        raise CheckpointError(f"checkpoint={p}: no such file (expected a model.pt).")
    if n_categories > 1:
        raise CheckpointError(
            f"checkpoint={p} is a single model.pt but {n_categories} categories are selected; "
            "pass the stage=train run directory instead, or select one dataset.category."
        )
    return p


def load(path: Path) -> dict[str, Any]:
    """``{"meta", "config", "state_dict"}`` of a verified model checkpoint (on the CPU)."""
    description, state = read_data(path, "model")
    meta, config = description.get("meta"), description.get("config")
    missing = [] if isinstance(meta, dict) else ["meta"]
    missing += [] if isinstance(config, dict) else ["config"]
    if not missing:
        missing += [f"meta.{k}" for k in META_KEYS if k not in meta]
        missing += [f"config.{k}" for k in MODEL_KEYS if k not in config]
    if missing or not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(
            f"checkpoint={path} is incomplete (missing or malformed: "
            f"{', '.join(missing) or 'state_dict'}); fit the model again with stage=train."
        )
    return {"meta": meta, "config": config, "state_dict": state}


def check_matches(payload: Mapping[str, Any], path: Path, config: Mapping[str, Any],
                  wanted: Mapping[str, Any], allow_other_category: bool,
                  allow_other_dataset: bool = False) -> None:
    """CheckpointError naming both values when the checkpoint was fitted on another setting.

    ``config`` are the requested :data:`MODEL_KEYS` groups; ``wanted`` the requested
    ``weights``, ``dataset`` and ``category``. Keys that change no computed value (the
    feature cache, ...) and the method's test-time keys (``k_shot``, ...) are not
    compared; the backbone's weights are compared by tag. A model fitted once on a whole
    (auxiliary) dataset is tested on any dataset and category: ``allow_other_dataset``
    leaves both out.
    """
    name = config["method"].get("name")
    at_test = set(keys_at_test(name)) if name else set()

    def model(groups: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
        backbone = {k: v for k, v in groups["backbone"].items()
                    if k not in NEUTRAL_BACKBONE_KEYS}
        method = dict(groups["method"])
        if method.get("name") == name:  # a key added since the file was written: its default
            method = {**method_defaults(name), **method}  # is what the model was fitted with
            method = comparable({k: v for k, v in method.items() if k not in at_test})
        keys = ("weights",) + (() if allow_other_dataset else ("dataset",)) + (
            () if allow_other_category or allow_other_dataset else ("category",))
        return {**{k: groups[k] for k in MODEL_KEYS}, "method": method, "backbone": backbone,
                **{k: meta[k] for k in keys}}

    diff = differences(model(payload["config"], payload["meta"]), model(config, wanted))
    if diff:
        shown = diff[:4]
        more = f" ({len(diff) - 4} more differences)" if len(diff) > 4 else ""
        hint = (" (or allow_other_category=true to test it on another category)"
                if any(k == "category" for k, _, _ in diff) else "")
        raise CheckpointError(
            f"checkpoint={path} was fitted with {', '.join(f'{k}={a!r}' for k, a, _ in shown)} "
            f"but this run asks for {', '.join(f'{k}={b!r}' for k, _, b in shown)}{more}; run "
            f"stage=test with the settings it was fitted with{hint}, or fit a new model."
        )


def check_unseen(payload: Mapping[str, Any], path: Path, dataset: str,
                 categories: list[str]) -> None:
    """CheckpointError when a model that learned from annotated test images (the auxiliary
    setting) would be tested on the categories whose test images it learned from: the
    figures would measure memory, not detection."""
    meta = payload["meta"]
    if meta["dataset"] != dataset:
        return
    seen = meta.get("categories")
    overlap = (sorted(set(categories) & set(seen)) if isinstance(seen, list)
               else list(categories))  # not recorded: every category may have been seen
    if overlap:
        raise CheckpointError(
            f"checkpoint={path} learned from the annotated test images of {dataset} "
            f"({', '.join(overlap[:5])}{', ...' if len(overlap) > 5 else ''}), and this run "
            "would test it on those images: test it on another dataset (e.g. trained on "
            "visa, tested on mvtec), or on categories it did not learn from."
        )


def restore(payload: Mapping[str, Any], source: Path, backbone: Mapping[str, Any],
            method_cfg: Mapping[str, Any]) -> AnomalyMethod:
    """Rebuild the method from the checkpoint's config and load its fitted state.

    The frozen backbone is not in the file: it is built from ``backbone`` (the run's
    backbone config, whose weights :func:`check_matches` has compared with the ones the
    model was fitted with). Test-time keys come from ``method_cfg``, the run's method
    config (e.g. the ``k_shot`` of this test).
    """
    cfg = payload["config"]
    requested = {k: method_cfg[k] for k in keys_at_test(cfg["method"]["name"])
                 if k in method_cfg}
    method = build_method({**cfg["method"], **requested}, backbone, cfg["layers"],
                          int(payload["meta"]["seed"]))
    load_fitted_state(method, payload["state_dict"], str(source))
    return method
