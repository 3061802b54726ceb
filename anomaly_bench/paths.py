"""Names that become paths: validated, so nothing is written outside the run directory.

Category and subset names come from data (folder names) and from config
(``dataset.category``); they name folders of the run directory. A name with a path
separator, ``..`` or an absolute path would escape it, so such names are refused, and
every path the runner writes is checked to resolve under the run directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from anomaly_bench.errors import ConfigError


def check_name(name: str, key: str) -> str:
    """``name`` when it is a plain file name (no separator, not ``.``/``..``); else ConfigError.

    ``key`` names where the value came from (``dataset.category``, a folder of a dataset).
    """
    text = str(name)
    bad = (not text or text in (".", "..") or "/" in text or "\\" in text or "\0" in text
           or os.path.isabs(text) or (os.altsep is not None and os.altsep in text))
    if bad:
        raise ConfigError(
            f"{key}={text!r} cannot name a folder of the run directory: a category or subset "
            "name must be a plain name without '/', '\\', '..' or an absolute path."
        )
    return text


def inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` when it resolves (symlinks followed) under ``root``; else ConfigError."""
    root_r = Path(root).resolve()
    target = Path(path)
    resolved = (target if target.is_absolute() else root_r / target).resolve()
    if resolved != root_r and root_r not in resolved.parents:
        raise ConfigError(
            f"refusing to write {path}: it resolves (following symbolic links) to {resolved}, "
            f"outside the run directory {root_r}."
        )
    return Path(path)
