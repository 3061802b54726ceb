"""Writing files so that a crash never leaves half a file and readers see old or new bytes.

Every file the project writes (results, scores, checkpoints, cache entries, summaries,
plots) goes through :func:`atomic_open`: the bytes are written to a temp file in the
target's folder and renamed over the target, which POSIX makes atomic. ``tempfile.mkstemp``
creates its file 0600; the result is given the mode an ordinary ``open`` would have
given it (0666 less the process umask), so shared run and cache folders stay readable.
Files opened in place (the results lock, the run's log) go through :func:`open_nofollow`.

Nothing is written through a symbolic link: a target that is a link is refused (a link
named ``cli.log`` or ``results.csv`` in a run directory would otherwise send the bytes to
a file elsewhere). Every failure to write is a :class:`WriteError` naming the target, and
:func:`describe` turns it into one sentence saying why and what to do.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


class WriteError(OSError):
    """A file or folder could not be written; ``filename`` names the target (never a temp
    file), ``errno`` says why (ENOSPC, EFBIG, EROFS, ENOTDIR, EACCES, ELOOP, ...)."""


#: What to do about a failed write, by errno.
_ADVICE = {
    errno.ENOSPC: "the disk is full: free space, or write the run elsewhere "
                  "(hydra.run.dir=PATH)",
    errno.EDQUOT: "the disk quota is used up: free space, or write the run elsewhere "
                  "(hydra.run.dir=PATH)",
    errno.EFBIG: "the file is larger than the file-size limit of the process (ulimit -f) or "
                 "of the filesystem: raise the limit, or write the run elsewhere",
    errno.EROFS: "the filesystem is read-only: write the run elsewhere (hydra.run.dir=PATH)",
    errno.ENOTDIR: "a part of the path is a file, not a folder: move that file away, or "
                   "write the run elsewhere (hydra.run.dir=PATH)",
    errno.EEXIST: "a file has the name of a folder that is needed: move that file away, or "
                  "write the run elsewhere (hydra.run.dir=PATH)",
    errno.EISDIR: "a folder has the name of the file: move that folder away",
    errno.EACCES: "permission denied: make the folder writable, or write the run elsewhere "
                  "(hydra.run.dir=PATH)",
    errno.EPERM: "the operation is not permitted: make the folder writable, or write the run "
                 "elsewhere (hydra.run.dir=PATH)",
    errno.ELOOP: "nothing is written through a symbolic link: remove the link, or write the "
                 "run elsewhere",
    errno.ENAMETOOLONG: "a name is longer than the filesystem allows: use a shorter name",
}


def describe(exc: OSError) -> str:
    """One sentence: what could not be written, why, and what to do."""
    where = exc.filename if exc.filename is not None else "a file"
    why = exc.strerror or str(exc) or type(exc).__name__
    advice = _ADVICE.get(exc.errno) if exc.errno is not None else None
    return f"cannot write {where}: {why}" + (f" ({advice})" if advice else "")


def write_error(path: str | os.PathLike, exc: OSError, tmp: str | None = None) -> WriteError:
    """``exc`` as a :class:`WriteError` naming ``path`` (or the folder that failed)."""
    if isinstance(exc, WriteError):
        return exc
    name = exc.filename if exc.filename not in (None, tmp) else path
    return WriteError(exc.errno, exc.strerror or str(exc), os.fspath(name))


def _link_error(path: str | os.PathLike) -> WriteError:
    return WriteError(errno.ELOOP, "it is a symbolic link", os.fspath(path))


def refuse_link(path: str | os.PathLike) -> None:
    """WriteError (ELOOP) when ``path`` itself is a symbolic link (dangling or not)."""
    if os.path.islink(path):
        raise _link_error(path)


def open_nofollow(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """``os.open`` that never follows a final symbolic link (``O_NOFOLLOW``): a file
    descriptor, or WriteError naming ``path``."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _link_error(path) from None
        raise write_error(path, exc) from None


class NoFollowFileHandler(logging.FileHandler):
    """``logging.FileHandler`` that appends to its file without following a symbolic link
    (the run's ``<job>.log``, configured in ``conf/config.yaml``)."""

    def _open(self) -> IO[str]:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in self.mode else os.O_TRUNC)
        fd = open_nofollow(self.baseFilename, flags)
        return os.fdopen(fd, self.mode.replace("b", ""), encoding=self.encoding,
                         errors=self.errors)


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
    removed and the target is left as it was; an OSError (of the folder, the write, the
    rename, or one a writer such as ``torch.save`` wrapped in its own exception) is raised
    as a :class:`WriteError` naming ``path``. A target that is a symbolic
    link is refused (the rename would replace the link; writing through it would escape).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        refuse_link(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        refuse_link(path)
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc, tmp) from None
    except Exception as exc:  # a writer (torch.save) that wraps the OSError of its write
        if isinstance(exc.__context__, OSError):
            raise write_error(path, exc.__context__, tmp) from exc
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_open`."""
    with atomic_open(path, "wb", durable=durable) as fh:
        fh.write(data)
