"""model.pt: a fitted method plus the config needed to rebuild it.

The file stores the complete ``state_dict`` (backbone included), so ``stage=test`` needs
neither the network nor the original weights file and reproduces the scores exactly.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from anomaly_bench.errors import CheckpointError
from anomaly_bench.methods import AnomalyMethod, build_method, load_fitted_state

FORMAT = "anomaly-bench/1"
#: Config groups that define a fitted model; ``stage=test`` rebuilds from these.
MODEL_KEYS = ("method", "backbone", "layers", "resolution", "alignment")


def save(path: Path, method: AnomalyMethod, config: dict[str, Any], category: str,
         seed: int) -> Path:
    """Write the checkpoint atomically (temp file + rename in the same folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "category": category,
        "seed": seed,
        "weights_tag": method.weights_tag,
        "config": {k: config[k] for k in MODEL_KEYS},
        "state_dict": {k: v.detach().cpu() for k, v in method.state_dict().items()},
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".model-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def locate(checkpoint: str | os.PathLike | None, category: str, n_categories: int) -> Path:
    """Find the model.pt for ``category``: a file (single category) or a run directory."""
    if not checkpoint:
        raise CheckpointError(
            "stage=test needs checkpoint=PATH: a model.pt written by stage=train, or the run "
            "directory of that run (holding <category>/model.pt)."
        )
    p = Path(checkpoint).expanduser()
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
    """Read a checkpoint written by :func:`save` (on the CPU)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint={path} cannot be read ({type(exc).__name__}: {exc}); expected a "
            "model.pt written by anomaly-bench stage=train."
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint={path} is not an anomaly-bench model (format {FORMAT} expected)."
        )
    return payload


def restore(payload: dict[str, Any], source: Path) -> AnomalyMethod:
    """Rebuild the method from the checkpoint's own config and load its fitted state."""
    cfg = payload["config"]
    # the network's weights come from the file, loaded into a private (unshared) instance
    backbone = dict(cfg["backbone"], pretrained=False, weights=None, shared=False)
    method = build_method(cfg["method"], backbone, cfg["layers"], int(payload["seed"]))
    load_fitted_state(method, payload["state_dict"], str(source))
    return method
