"""Data files: tensors, numbers and strings with a description and a checksum, never code.

Every file the project reads back as state (a model checkpoint, a training state) goes
through here. It holds only tensors, numbers, strings and containers, and is read with
``torch.load(weights_only=True)``, which refuses any other pickled object (a crafted file
cannot run a command). A SHA-256 over the format, the kind of file, the description and
every tensor's name, dtype, shape and bytes is verified on load, so a damaged file is an
error instead of silently different values. The module sits below the methods and the
training loop, which both use it (:mod:`anomaly_bench.checkpoint`,
:mod:`anomaly_bench.training`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from anomaly_bench.errors import CheckpointError
from anomaly_bench.fsutil import atomic_open

FORMAT = "anomaly-bench/2"


def _walk(obj: Any, digest: Any) -> None:
    """Feed ``obj`` to ``digest`` in a canonical order: tensors by dtype, shape and bytes."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, Mapping):
        digest.update(b"{")
        for key in sorted(obj, key=repr):
            digest.update(f"{key!r}:".encode())
            _walk(obj[key], digest)
        digest.update(b"}")
    elif isinstance(obj, list | tuple):
        digest.update(b"[")
        for item in obj:
            _walk(item, digest)
        digest.update(b"]")
    else:
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())


def checksum(obj: Any) -> str:
    """SHA-256 of a nested structure of tensors, numbers, strings and containers."""
    digest = hashlib.sha256()
    _walk(obj, digest)
    return digest.hexdigest()


def write_data(path: Path, kind: str, description: Mapping[str, Any], data: Any) -> Path:
    """Write ``data`` (tensors, numbers, strings, containers) with its description, atomically.

    ``kind`` names what the file holds (``model``, ``training``); the checksum covers
    format, kind, description and data.
    """
    payload = {"format": FORMAT, "kind": kind, "description": dict(description), "data": data}
    payload["checksum"] = checksum([FORMAT, kind, payload["description"], data])
    with atomic_open(path, "wb") as fh:
        torch.save(payload, fh)
    return path


def read_data(path: Path, kind: str) -> tuple[dict[str, Any], Any]:
    """(description, data) of a file written by :func:`write_data` with ``kind``.

    CheckpointError when it cannot be read as plain data (a pickled object of any other
    type is refused, never constructed), is of another format or kind, misses an entry,
    or its checksum does not match its content.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint={path} cannot be read as an anomaly-bench file ({first}); it is "
            "corrupt, truncated, or holds objects other than tensors, numbers and strings "
            "(which are never loaded). Expected a file written by anomaly-bench."
        ) from None
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt != FORMAT or payload.get("kind") != kind:
        raise CheckpointError(
            f"checkpoint={path} has format {fmt!r} and kind "
            f"{payload.get('kind') if isinstance(payload, dict) else None!r}, expected "
            f"{FORMAT!r} and {kind!r}: it was not written by this version of anomaly-bench as "
            f"a {kind} file; fit again."
        )
    missing = [k for k in ("description", "data", "checksum") if k not in payload]
    if missing or not isinstance(payload["description"], dict):
        raise CheckpointError(
            f"checkpoint={path} is incomplete (missing or malformed: "
            f"{', '.join(missing) or 'description'}); fit again."
        )
    if checksum([FORMAT, kind, payload["description"], payload["data"]]) != payload["checksum"]:
        raise CheckpointError(
            f"checkpoint={path} is corrupt: its content does not match the checksum written "
            "with it (the file was modified or damaged); fit again."
        )
    return payload["description"], payload["data"]
