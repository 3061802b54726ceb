"""Writing files so that a crash never leaves half a file and readers see old or new bytes.

Every file the project writes (results, scores, checkpoints, cache entries, summaries)
goes through :func:`atomic_open`: the bytes are written to a temp file in the target's
folder and renamed over the target, which POSIX makes atomic. ``tempfile.mkstemp``
creates its file 0600; the result is given the mode an ordinary ``open`` would have
given it (0666 less the process umask), so shared run and cache folders stay readable.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _read_umask() -> int:
    """The process umask, read without changing it where /proc allows (thread-safe)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permission bits ``open()`` gives a new file under the current umask."""
    return 0o666 & ~_read_umask()


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, durable: bool = True,
                **kwargs: Any) -> Iterator[IO]:
    """Open a temp file beside ``path`` for writing; on success rename it to ``path``.

    ``mode`` is ``"w"`` or ``"wb"``; ``kwargs`` go to :func:`open` (e.g. ``newline=""``).
    ``durable`` flushes the bytes to disk before the rename (results and checkpoints); a
    cache entry that can always be recomputed skips it. On an exception the temp file is
    removed and the target is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_open`."""
    with atomic_open(path, "wb", durable=durable) as fh:
        fh.write(data)
