"""Resumable HTTP downloads, verified by SHA-256.

A file is fetched into ``<target>.part`` beside its target; a download cut short keeps its
bytes, and the next attempt asks the server for the rest (an HTTP ``Range`` request; a
server that answers with the whole file starts it again). Only a file whose SHA-256 equals
the published one is renamed to its target; one that differs is removed and reported,
naming both digests, since retrying it could only give the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from anomaly_bench.errors import DataError
from anomaly_bench.fsutil import refuse_link

CHUNK = 1 << 20
TIMEOUT_S = 60


@dataclass(frozen=True)
class Remote:
    """A published file: where it is, its SHA-256 and the name it is stored under."""

    url: str
    sha256: str
    filename: str


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(remote: Remote, folder: Path, progress: bool = True) -> Path:
    """``folder/<filename>``, downloaded (or resumed) and verified; reused when present
    with the right digest."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / remote.filename
    part = folder / f"{remote.filename}.part"
    refuse_link(target)
    refuse_link(part)
    if target.is_file() and sha256_of(target) == remote.sha256:
        return target
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(remote.url, headers={"Range": f"bytes={have}-"}
                                     if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part already holds every byte
            response = None
        else:
            raise DataError(f"cannot download {remote.url}: HTTP {exc.code} {exc.reason}.") \
                from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"cannot download {remote.url}: {reason}. Run again to resume "
                        f"({have} bytes kept in {part}).") from None
    if response is not None:
        with response:
            resumed = response.status == 206
            if not resumed:
                have = 0  # the server sends the whole file
            length = response.headers.get("Content-Length")
            total = have + int(length) if length and length.isdigit() else None
            bar = tqdm(total=total, initial=have, unit="B", unit_scale=True,
                       desc=remote.filename, disable=not progress, leave=False)
            try:
                with part.open("ab" if resumed else "wb") as fh:
                    while True:
                        try:
                            chunk = response.read(CHUNK)
                        except (OSError, ValueError) as exc:  # connection dropped
                            raise DataError(
                                f"the download of {remote.url} stopped after "
                                f"{fh.tell()} bytes ({exc}). Run again to resume from there "
                                f"({part}).") from None
                        if not chunk:
                            break
                        fh.write(chunk)
                        bar.update(len(chunk))
                    got = fh.tell()
            finally:
                bar.close()
            if total is not None and got < total:
                raise DataError(f"the download of {remote.url} stopped after {got} of {total} "
                                f"bytes. Run again to resume from there ({part}).")
    digest = sha256_of(part)
    if digest != remote.sha256:
        part.unlink()
        raise DataError(
            f"{remote.url} gave a file whose SHA-256 is {digest}, but the published one is "
            f"{remote.sha256}: the file was removed. A changed or damaged file on the server "
            "(or a proxy) cannot be used; download it by hand from the dataset's site and "
            "check it with anomaly-bench-data check.")
    os.replace(part, target)
    return target
