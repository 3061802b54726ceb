"""``anomaly-bench-data``: check a dataset folder against its published layout and image
counts, or download a dataset whose licence allows it.

    anomaly-bench-data list
    anomaly-bench-data check DATASET [--root PATH | --data-root DIR]
    anomaly-bench-data download DATASET [--data-root DIR] [--url URL --sha256 HEX]
    anomaly-bench-data meta mvtec|visa [--root PATH | --data-root DIR] [--category C ...]
        [--force]

``check`` reads the folder with the dataset's own layout (what a run reads: every
category, its training and test images and masks) and compares each category's image
counts with the published ones (:mod:`anomaly_bench.data.catalog`); anything missing or
different is one paragraph naming the categories and the numbers (exit 2). ``download``
fetches the dataset's files (resumable, SHA-256 checked, with a progress bar) into
``DATA_DIR/.downloads``, unpacks them into ``DATA_DIR/<dataset folder>`` (never outside
it, never through a link) and checks the result. ``--url``/``--sha256`` take the main
archive from a mirror instead. ``meta`` writes the ``meta.json`` index the APRIL-GAN and
WinCLIP repositories read (:mod:`anomaly_bench.data.meta`) from the folders (and VisA's
split file), every category or the ones named; an existing index that differs is replaced
only with ``--force``, since runs read a root through its index.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

from anomaly_bench.data import get_layout, meta
from anomaly_bench.data.catalog import COUNT_SOURCES, NOT_DOWNLOADED, PUBLISHED, SOURCES, Counts
from anomaly_bench.data.registry import DATA_ENV_VAR, available_layouts, resolve_root, title
from anomaly_bench.download import Remote, fetch
from anomaly_bench.errors import AnomalyBenchError, ConfigError, DataError, some
from anomaly_bench.fsutil import atomic_write_bytes
from anomaly_bench.types import ANOMALOUS

#: layouts that are not a published dataset (nothing to count or download)
NOT_PUBLISHED = ("folder", "synthetic")


def _options(name: str) -> dict:
    from anomaly_bench.configs import option_values

    try:
        return option_values("dataset", name)
    except OSError:
        return {"name": name}


def _layout(name: str):
    layout = get_layout(name)
    if hasattr(layout, "configure"):
        layout = layout.configure(_options(name))
    return layout


def counts_of(layout, root: Path, category: str) -> Counts:
    """A category's (training, normal test, anomalous test) image counts as a run reads them."""
    split = layout.split(root, category)
    bad = sum(1 for r in split.test if r.label == ANOMALOUS)
    return Counts(len(split.train), len(split.test) - bad, bad)


def check(name: str, root: Path) -> list[str]:
    """Lines describing each category of the dataset at ``root``; DataError (one paragraph)
    naming every missing category, unreadable category and count that differs from the
    published one."""
    layout = _layout(name)
    published = PUBLISHED.get(name)
    found = layout.categories(root)
    expected = list(published or getattr(layout, "known_categories", None) or [])
    problems, lines, missing = [], [], []
    for category in [*expected, *(c for c in found if c not in expected)]:
        want = published.get(category) if published else None
        if category not in found:
            missing.append(category)
            continue
        try:
            got = counts_of(layout, root, category)
        except DataError as exc:
            problems.append(f"{category} cannot be read: {exc}")
            continue
        text = (f"{category}: {got.train} training, {got.test_normal} normal and "
                f"{got.test_anomalous} anomalous test images")
        if want is not None and got != want:
            problems.append(f"{category} has {got.train}/{got.test_normal}/{got.test_anomalous} "
                            f"training/normal test/anomalous test images where "
                            f"{COUNT_SOURCES[name]} has {want.train}/{want.test_normal}/"
                            f"{want.test_anomalous}")
            text += " (differs from the published counts)"
        elif want is not None:
            text += " (as published)"
        lines.append(text)
    if missing:
        problems.append(f"{len(missing)} of its {len(expected)} categories are missing ("
                        + ", ".join(missing) + ")")
    if problems:
        raise DataError(
            f"the {title(layout)} folder {root} does not hold the dataset as published: "
            + some(problems, 8)
            + ". Complete the folder (download the dataset again, or unpack the missing "
            "categories) or point dataset.root / data_root at a complete copy."
        )
    if not lines:
        raise DataError(f"no {title(layout)} category found in {root}.")
    if published is None:
        lines.append(f"(no published per-category counts for {title(layout)}: layout checked, "
                     "counts not compared)")
    return lines


def _root(name: str, root: Path | None, data_root: Path) -> Path:
    opts = _options(name)
    return resolve_root(name, root, data_root, list(opts.get("dirnames") or ["."]))


def write_meta(name: str, root: Path, categories: list[str] | None, force: bool
               ) -> list[str]:
    """Write ``root/meta.json`` from the folders; lines describing what was written."""
    layout = _layout(name)
    wanted = categories or layout.read_categories(root)
    if not wanted:
        raise DataError(f"no {title(layout)} category found in {root}.")
    data = meta.build(name, [layout.read_split(root, c) for c in wanted])
    text, path = meta.text(data), meta.path_of(root)
    if path.is_file() and not force:
        if path.read_text(encoding="utf-8", errors="replace") == text:
            return [f"{path} is up to date ({len(wanted)} categories)"]
        raise DataError(f"{path} exists and differs from the index of the folders; runs read "
                        "the dataset through it. Keep it, or rewrite it with --force.")
    atomic_write_bytes(path, text.encode("utf-8"))
    return [f"wrote {path}"] + [
        f"{c}: {len(data['train'][c])} training, {len(data['test'][c])} test images"
        for c in wanted]


def _member(dest: Path, archive: Path, name: str) -> Path:
    """Where an archive member goes: inside ``dest`` (resolved), else DataError."""
    target = (dest / name).resolve()
    if target != dest.resolve() and dest.resolve() not in target.parents:
        raise DataError(f"{archive} holds {name}, which would unpack outside {dest}: refused.")
    return target


def _unpack(archive: Path, dest: Path) -> None:
    """Unpack a tar or zip archive into ``dest``: members only inside it, no links."""
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                target = _member(dest, archive, info.filename)
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise DataError(f"{archive} holds a symbolic link {info.filename}: refused.")
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out)
        return
    try:
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                if member.issym() or member.islnk():
                    raise DataError(f"{archive} holds a link {member.name}: refused.")
                _member(dest, archive, member.name)
            tf.extractall(dest, filter="data")
    except tarfile.TarError as exc:
        raise DataError(f"{archive} is not a tar or zip archive ({exc}).") from None


def _dataset_folder(dest: Path) -> Path:
    """``dest``, or the folder an archive put everything in (one visible subfolder)."""
    folder = dest
    while True:
        visible = [p for p in folder.iterdir() if not p.name.startswith(".")]
        if len(visible) == 1 and visible[0].is_dir() and not visible[0].is_symlink():
            folder = visible[0]
        else:
            return folder


def download(name: str, data_root: Path, url: str | None = None,
             sha256: str | None = None, progress: bool = True) -> Path:
    """Fetch, unpack and check a dataset; the folder that holds it."""
    if name not in SOURCES:
        why = NOT_DOWNLOADED.get(name, "no download is known for it")
        raise ConfigError(f"dataset {name} is not downloaded by anomaly-bench-data: {why}. "
                          f"Then check the folder with anomaly-bench-data check {name}.")
    source = SOURCES[name]
    files = list(source.files)
    if url or sha256:
        if not (url and sha256):
            raise ConfigError("--url and --sha256 go together: a mirror's file is only used "
                              "with the digest it must have.")
        files[0] = Remote(url, sha256.lower(), files[0].filename)
    dirname = (_options(name).get("dirnames") or [name])[0]
    dest = data_root / dirname
    cache = data_root / ".downloads"
    fetched = [fetch(remote, cache, progress) for remote in files]
    for path, member in zip(fetched, source.members, strict=True):
        if member is None:
            marker = dest / f".unpacked-{path.name}"
            if not marker.is_file():
                _unpack(path, dest)
                marker.write_text("unpacked\n")
    root = _dataset_folder(dest)
    for path, member in zip(fetched, source.members, strict=True):
        if member is not None:
            target = _member(root, path, member)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="anomaly-bench-data", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="datasets, their published counts and whether they download")
    default_root = Path(os.environ.get(DATA_ENV_VAR, "data"))
    for command in ("check", "download", "meta"):
        p = sub.add_parser(command)
        p.add_argument("dataset")
        p.add_argument("--data-root", type=Path, default=default_root,
                       help=f"folder holding the datasets (default: ${DATA_ENV_VAR} or ./data)")
        if command in ("check", "meta"):
            p.add_argument("--root", type=Path, default=None,
                           help="the dataset folder itself (default: found under --data-root)")
        if command == "meta":
            p.add_argument("--category", nargs="+", default=None,
                           help="the categories to index (default: every one in the folders)")
            p.add_argument("--force", action="store_true",
                           help="replace an existing meta.json that differs")
        elif command == "download":
            p.add_argument("--url", default=None, help="a mirror of the dataset's archive")
            p.add_argument("--sha256", default=None, help="the SHA-256 the mirror's file has")
            p.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.command == "list":
            for name in available_layouts():
                if name in NOT_PUBLISHED:
                    continue
                counts = f"counts: {COUNT_SOURCES[name]}" if name in PUBLISHED \
                    else "counts: not published per category"
                how = (f"downloads ({SOURCES[name].licence})" if name in SOURCES
                       else f"not downloaded: {NOT_DOWNLOADED.get(name, 'no source known')}")
                print(f"{name}: {counts}; {how}")
            return 0
        name = str(args.dataset)
        if name in NOT_PUBLISHED:
            known = sorted(set(available_layouts()) - set(NOT_PUBLISHED))
            raise ConfigError(f"dataset {name} has no published form to check or download; "
                              f"choose one of {', '.join(known)}.")
        get_layout(name)  # an unknown name is one paragraph listing the known ones
        if args.command == "meta":
            if name not in meta.SPECIES:
                raise ConfigError(f"the official repositories write meta.json for "
                                  f"{' and '.join(meta.SPECIES)} only, not {name}.")
            root = _root(name, args.root, args.data_root.expanduser())
            for line in write_meta(name, root, args.category, args.force):
                print(line)
            return 0
        if args.command == "download":
            root = download(name, args.data_root.expanduser(), args.url, args.sha256,
                            progress=not args.no_progress)
        else:
            root = _root(name, args.root, args.data_root.expanduser())
        lines = check(name, root)
    except AnomalyBenchError as exc:
        print(f"anomaly-bench-data: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"anomaly-bench-data: error: {exc.filename or ''} {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    print(f"{name} at {root}:")
    for line in lines:
        print(f"  {line}")
    return 0


def main_exit() -> None:
    """Console script ``anomaly-bench-data``."""
    raise SystemExit(main())


if __name__ == "__main__":
    main_exit()
