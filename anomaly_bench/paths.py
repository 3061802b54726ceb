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

#: The longest file name (bytes) when the filesystem cannot be asked (POSIX's NAME_MAX).
NAME_MAX = 255


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name (bytes) the filesystem of ``folder`` (or of its nearest
    existing parent) takes."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return int(os.pathconf(path, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return NAME_MAX


def check_name(name: str, key: str, folder: str | os.PathLike | None = None) -> str:
    """``name`` when it is a plain file name (no separator, not ``.``/``..``) that the
    filesystem of ``folder`` (the run directory; default: any POSIX one) can take; else
    ConfigError.

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
    size = len(text.encode("utf-8", "surrogateescape"))
    limit = name_max(folder) if folder is not None else NAME_MAX
    if size > limit:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise ConfigError(
            f"{key}={shown!r} is {size} bytes long, but a folder name of the run directory "
            f"can have at most {limit} bytes on its filesystem: use a shorter category or "
            "subset name (rename its folder, or pass a shorter dataset.category)."
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
