"""The on-disk feature cache: racing writers, readers in a fresh process, and entries that
must not be used (damaged, truncated, empty, of another shape or format)."""

import json
import logging
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch

from anomaly_bench.memo import content_key

LAYERS_A = {"layer1": 0, "layer2": -1}
LAYERS_B = {"layer1": 1, "layer2": 0}


def _images() -> torch.Tensor:
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _run(cache_dir: str, layers: dict, out: str) -> None:
    """One 'job' in its own process: extract through the cache, save what it got."""
    from anomaly_bench.backbones import FeatureExtractor
    from anomaly_bench.backbones.cache import FeatureCache, flush_writes

    ex = FeatureExtractor("resnet18", layers, pretrained=False, seed=0)
    ex.attach_cache(FeatureCache(cache_dir, ex.backbone_id))
    with torch.inference_mode():
        feats = ex(_images())
    flush_writes()
    torch.save({"feats": {k: v.contiguous() for k, v in feats.items()},
                "hits": ex.cache.hits, "misses": ex.cache.misses}, out)


@pytest.mark.slow
def test_racing_jobs_and_a_later_process_share_entries(tmp_path: Path):
    ctx = mp.get_context("spawn")
    cache = str(tmp_path / "cache")
    racers = [ctx.Process(target=_run, args=(cache, LAYERS_A, str(tmp_path / f"r{i}.pt")))
              for i in range(2)]
    for p in racers:
        p.start()
    for p in racers:
        p.join(120)
        assert p.exitcode == 0
    first, second = (torch.load(tmp_path / f"r{i}.pt") for i in range(2))
    for stage in LAYERS_A:
        assert torch.equal(first["feats"][stage], second["feats"][stage])
    files = [p for p in Path(cache).rglob("*") if p.is_file()]
    assert len(files) == 4 and not [p for p in files if p.name.startswith(".")]  # no temp files
    # a later job in a fresh process picks other blocks of the same stages: all from disk
    later = ctx.Process(target=_run, args=(cache, LAYERS_B, str(tmp_path / "later.pt")))
    later.start()
    later.join(120)
    assert later.exitcode == 0
    got = torch.load(tmp_path / "later.pt")
    assert got["hits"] == 4 and got["misses"] == 0

    from anomaly_bench.backbones import FeatureExtractor

    direct = FeatureExtractor("resnet18", LAYERS_B, pretrained=False, seed=0)
    with torch.inference_mode():
        want = direct(_images())
    for stage in LAYERS_B:
        torch.testing.assert_close(got["feats"][stage], want[stage].contiguous())


# --- entries that must not be used ------------------------------------------------------

LAYERS = {"layer1": 0, "layer2": -1}
NAMES = ["layer1.0", "layer2.1"]


@pytest.fixture
def no_memo():
    """Every load reads the disk: the process memo is off for the test."""
    from anomaly_bench.memo import MEMO

    budget = MEMO.budget
    MEMO.configure(0)
    MEMO.clear()
    yield
    MEMO.configure(budget)


def _extractor(root: Path | None):
    from anomaly_bench.backbones import FeatureExtractor
    from anomaly_bench.backbones.cache import FeatureCache

    ex = FeatureExtractor("resnet18", LAYERS, pretrained=False, seed=0)
    if root is not None:
        ex.attach_cache(FeatureCache(root, ex.backbone_id))
    return ex


def _extract(root: Path | None, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Features of ``images`` through a fresh cache object on ``root`` (None: no cache)."""
    from anomaly_bench.backbones.cache import flush_writes

    with torch.inference_mode():
        feats = _extractor(root)(images)
    flush_writes()
    return feats


def _populate(root: Path) -> tuple[torch.Tensor, list[str], list[Path]]:
    """Images, their keys and their entry files, stored through the extractor."""
    images = _images()[:2]
    _extract(root, images)
    cache = _extractor(root).cache
    keys = [content_key(img) for img in images]
    paths = [cache._path(k) for k in keys]
    assert all(p.is_file() for p in paths)
    return images, keys, paths


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "anomaly_bench" and r.levelno == logging.WARNING]


def _assert_warned(caplog, path: Path, fault: str) -> None:
    """One warning, naming ``path`` and then ``fault``."""
    warned = _warnings(caplog)
    assert len(warned) == 1 and str(path) in warned[0], warned
    assert fault in warned[0].split(str(path), 1)[1], warned


def _assert_discarded(root: Path, keys: list[str], path: Path, caplog, fault: str) -> None:
    """Loading the batch gives None without raising, warns naming ``path`` and ``fault``,
    and removes the entry."""
    cache = _extractor(root).cache
    with caplog.at_level(logging.WARNING, logger="anomaly_bench"):
        assert cache.load(keys, NAMES) is None
    assert cache.misses == len(keys) and cache.hits == 0
    _assert_warned(caplog, path, fault)
    assert not path.exists()


def _assert_recomputed(root: Path, images: torch.Tensor, paths: list[Path], caplog) -> None:
    """The extractor output equals a computation without cache, and every entry is stored
    again and verifies."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anomaly_bench"):
        got = _extract(root, images)
        want = _extract(None, images)
        for stage in LAYERS:
            assert torch.equal(got[stage], want[stage]), stage
        assert all(p.is_file() for p in paths)
        again = _extract(root, images)  # from disk: the memo is off
        for stage in LAYERS:
            assert torch.equal(again[stage], want[stage]), stage
    assert not _warnings(caplog)


def _tensor_span(raw: bytes, name: str) -> tuple[int, int]:
    """Byte range of tensor ``name`` in a safetensors file."""
    n = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return 8 + n + start, 8 + n + end


def _rewrite(path: Path, change) -> None:
    """Replace an entry by a consistent-looking one (valid record and checksums) holding
    ``change(name, tensor)`` for each tensor."""
    from safetensors.torch import load_file

    from anomaly_bench.backbones.cache import entry_bytes

    tensors = {n: change(n, t).contiguous() for n, t in load_file(path).items()}
    path.write_bytes(entry_bytes(tensors))


def test_entries_record_format_shapes_dtypes_and_checksums(tmp_path: Path, no_memo):
    from safetensors import safe_open

    from anomaly_bench.backbones.cache import FORMAT_VERSION, RECORD_KEY, tensor_digest

    old = os.umask(0o022)
    try:
        _, _, paths = _populate(tmp_path)
    finally:
        os.umask(old)
    with safe_open(str(paths[0]), framework="pt") as fh:
        record = json.loads(fh.metadata()[RECORD_KEY])
        assert record["version"] == FORMAT_VERSION
        assert set(record["tensors"]) == set(fh.keys()) >= set(NAMES)
        for n in fh.keys():
            t = fh.get_tensor(n)
            assert record["tensors"][n] == {"shape": list(t.shape), "dtype": "float32",
                                            "xxh3_128": tensor_digest(t)}
    assert paths[0].stat().st_mode & 0o777 == 0o644  # the umask's mode, not mkstemp's 0600


def test_flipped_tensor_bytes_are_discarded_and_recomputed(tmp_path: Path, caplog, no_memo):
    images, keys, paths = _populate(tmp_path)
    raw = bytearray(paths[1].read_bytes())
    start, end = _tensor_span(bytes(raw), "layer2.1")
    raw[(start + end) // 2] ^= 0x5A
    paths[1].write_bytes(bytes(raw))
    _assert_discarded(tmp_path, keys, paths[1], caplog, "checksum")
    _assert_recomputed(tmp_path, images, paths, caplog)


def test_entries_of_another_shape_are_discarded(tmp_path: Path, caplog, no_memo):
    """Every entry of the batch holds half the channels, with a matching record: only the
    shapes the extractor expects reveal it."""
    images, _, paths = _populate(tmp_path)
    for p in paths:
        _rewrite(p, lambda n, t: t[..., : t.shape[-1] // 2])
    with caplog.at_level(logging.WARNING, logger="anomaly_bench"):
        got = _extract(tmp_path, images)
    _assert_warned(caplog, paths[0], "shape")
    want = _extract(None, images)
    for stage in LAYERS:
        assert torch.equal(got[stage], want[stage]), stage
    _assert_recomputed(tmp_path, images, paths, caplog)


def test_entries_of_one_batch_must_agree(tmp_path: Path, caplog, no_memo):
    """Without expected shapes, an entry unlike the first of its batch is discarded."""
    images, keys, paths = _populate(tmp_path)
    _rewrite(paths[1], lambda n, t: t[1:] if n == "layer1.0" else t)
    _assert_discarded(tmp_path, keys, paths[1], caplog, "shape")
    _assert_recomputed(tmp_path, images, paths, caplog)


def test_record_must_match_the_tensor(tmp_path: Path, caplog, no_memo):
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from anomaly_bench.backbones.cache import RECORD_KEY

    images, keys, paths = _populate(tmp_path)
    with safe_open(str(paths[0]), framework="pt") as fh:
        record = json.loads(fh.metadata()[RECORD_KEY])
    record["tensors"]["layer2.1"]["shape"] = [1, 2, 3]
    meta = {RECORD_KEY: json.dumps(record)}
    paths[0].write_bytes(save(load_file(paths[0]), metadata=meta))
    _assert_discarded(tmp_path, keys, paths[0], caplog, "record")
    _assert_recomputed(tmp_path, images, paths, caplog)


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_truncated_or_empty_entry_is_recomputed(tmp_path: Path, caplog, no_memo, damage: str):
    images, keys, paths = _populate(tmp_path)
    raw = paths[0].read_bytes()
    paths[0].write_bytes(raw[: len(raw) - 100] if damage == "truncated" else b"")
    _assert_discarded(tmp_path, keys, paths[0], caplog, "unreadable")
    _assert_recomputed(tmp_path, images, paths, caplog)


@pytest.mark.parametrize("version", [None, 1])
def test_entry_of_another_format_is_discarded(tmp_path: Path, caplog, no_memo,
                                              version: int | None):
    """An entry without a record (as written before records existed), or whose record is
    of another version."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from anomaly_bench.backbones.cache import RECORD_KEY

    images, keys, paths = _populate(tmp_path)
    with safe_open(str(paths[0]), framework="pt") as fh:
        record = json.loads(fh.metadata()[RECORD_KEY])
    record["version"] = version
    meta = None if version is None else {RECORD_KEY: json.dumps(record)}
    paths[0].write_bytes(save(load_file(paths[0]), metadata=meta))
    _assert_discarded(tmp_path, keys, paths[0], caplog, "format")
    _assert_recomputed(tmp_path, images, paths, caplog)


# --- where a batch comes from, and what the log says ------------------------------------

def test_without_the_memo_queued_then_written_entries_are_read_not_recomputed(
        tmp_path: Path, caplog, no_memo, monkeypatch):
    """A job that cannot use the memo takes entries still waiting for the writer from its
    queue, and written ones from disk; only the first job runs the backbone, and the log
    says so."""
    import threading

    from anomaly_bench.backbones import cache as fc

    gate = threading.Event()
    write = fc.write_entry
    monkeypatch.setattr(fc, "write_entry", lambda *a, **k: gate.wait(60) and write(*a, **k))
    images = _images()[:2]

    def extract(ex):
        with torch.inference_mode():
            return ex(images)

    def network_free():
        ex = _extractor(tmp_path)
        ex.stem = None  # a batch served from the cache never touches the network
        return ex

    fc.reset_stats()
    try:
        with caplog.at_level(logging.INFO, logger="anomaly_bench"):
            first = extract(_extractor(tmp_path))
        assert "running the backbone on a batch of 2 images" in caplog.text
        assert (fc.STATS.memory, fc.STATS.disk, fc.STATS.computed) == (0, 0, 2)
        queued = extract(network_free())  # nothing written yet: served from the queue
        assert (fc.STATS.memory, fc.STATS.disk, fc.STATS.computed) == (2, 0, 2)
    finally:
        gate.set()
        fc.flush_writes()
    stored = extract(network_free())
    assert (fc.STATS.memory, fc.STATS.disk, fc.STATS.computed) == (2, 2, 2)
    assert fc.STATS.describe() == ("2 images from memory, 2 from disk, 2 through the "
                                   "backbone (in neither memory nor the cache folder)")
    for stage in LAYERS:
        assert torch.equal(queued[stage], first[stage])
        assert torch.equal(stored[stage], first[stage])


def test_callback_logs_each_job_and_reports_the_folder_at_the_end(tmp_path: Path, caplog,
                                                                   capsys, no_memo):
    from omegaconf import OmegaConf

    from anomaly_bench.report.callbacks import SweepSummary

    root = tmp_path / "cache"
    (tmp_path / "sweep").mkdir()
    cfg = OmegaConf.create({"backbone": {"cache": {"enabled": True, "dir": str(root),
                                                   "max_gb": 5}},
                            "hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}})
    callback = SweepSummary()
    images = _images()[:2]
    with caplog.at_level(logging.INFO, logger="anomaly_bench"):
        for _ in range(2):
            callback.on_job_start(cfg)
            _extract(root, images)
            callback.on_job_end(cfg)
        callback.on_multirun_end(cfg)
    jobs = [m for m in caplog.messages if m.startswith("feature cache: 0 images")]
    assert jobs == ["feature cache: 0 images from memory, 0 from disk, 2 through the backbone "
                    "(in neither memory nor the cache folder)",
                    "feature cache: 0 images from memory, 2 from disk, 0 through the backbone"]
    printed = capsys.readouterr().out
    assert f"feature cache: {root.resolve()}: 2 entries" in printed
    assert "(backbone.cache.max_gb=5)" in printed and "--clear" in printed


# --- size cap, least recently used first, concurrent jobs -------------------------------

def _fake_entries(root: Path, n: int, size: int) -> list[Path]:
    """``n`` files named as entries, ``size`` bytes each, used one second apart (oldest
    first)."""
    import hashlib
    import time

    now = time.time()
    out = []
    for i in range(n):
        key = hashlib.sha1(str(i).encode()).hexdigest()
        p = root / "0123456789abcdef" / key[:2] / f"{key}.safetensors"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * size)
        os.utime(p, (now - 100 + i, now - 100 + i))
        out.append(p)
    return out


def test_trim_removes_least_recently_used_entries_only(tmp_path: Path):
    import time

    from anomaly_bench.backbones.cache import folder_size, trim

    paths = _fake_entries(tmp_path, 6, 1000)
    now = time.time()
    os.utime(paths[0], (now, now))  # the oldest entry was read last
    stale = paths[1].parent / f".{paths[1].name}.abc.tmp"  # left by a stopped writer
    stale.write_bytes(b"partial")
    os.utime(stale, (now - 7200, now - 7200))
    foreign = [tmp_path / "notes.txt", paths[1].parent / "other.bin",
               tmp_path / "not-a-backbone" / "ab" / paths[2].name]
    for f in foreign:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"keep me")
    removed = trim(tmp_path, 3000)
    assert {p for p in paths if p.exists()} == {paths[0], paths[4], paths[5]}
    assert (removed.entries, removed.bytes, removed.temp_files) == (3, 3000, 1)
    assert folder_size(tmp_path) == 3000 and all(f.exists() for f in foreign)


def test_cache_stays_under_its_cap_and_keeps_what_was_read_last(tmp_path: Path, no_memo,
                                                                 monkeypatch, caplog):
    """Three single-image batches through a cache capped at 2.5 entries: the entry read
    again survives, the one not read since it was written goes, and a warning says the
    cap is smaller than what the run reuses."""
    import time

    from anomaly_bench.backbones import cache as fc

    monkeypatch.setattr(fc, "_MAX_BYTES", {})
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    a, b, c = (images[i: i + 1] for i in range(3))
    _extract(tmp_path / "probe", a)
    size = fc.folder_size(tmp_path / "probe")
    fc.set_max_gb(tmp_path, 2.5 * size / fc.GIB)
    _extract(tmp_path, a)
    _extract(tmp_path, b)
    path = {x: _extractor(tmp_path).cache._path(content_key(x[0])) for x in (a, b, c)}
    now = time.time()
    os.utime(path[a], (now - 20, now - 20))  # a written first, b later
    os.utime(path[b], (now - 10, now - 10))
    reader = _extractor(tmp_path)
    reader.stem = None
    with torch.inference_mode():
        reader(a)  # read from disk: a becomes the most recently used
    monkeypatch.setattr(fc, "_warned_cap", False)
    with caplog.at_level(logging.INFO, logger="anomaly_bench"):
        _extract(tmp_path, c)  # a third entry exceeds the cap
    assert path[a].exists() and path[c].exists() and not path[b].exists()
    assert fc.folder_size(tmp_path) <= 2.5 * size
    assert "removed the 1 least recently used entries" in caplog.text
    assert len(_warnings(caplog)) == 1 and "max_gb" in _warnings(caplog)[0]


def test_entries_vanishing_under_a_job_only_make_it_recompute(tmp_path: Path, caplog,
                                                              no_memo, monkeypatch):
    """An entry removed between listing and reading (by another job's cap or a clear) is a
    miss, not an error and not a damaged entry; removers racing each other and a reader
    never fail either."""
    import threading

    from anomaly_bench.backbones import cache as fc

    images, keys, _ = _populate(tmp_path)
    want = _extract(None, images)
    read = fc.read_entry

    def vanish_then_read(path, *args, **kwargs):
        Path(path).unlink(missing_ok=True)
        return read(path, *args, **kwargs)

    monkeypatch.setattr(fc, "read_entry", vanish_then_read)
    with caplog.at_level(logging.WARNING, logger="anomaly_bench"):
        assert _extractor(tmp_path).cache.load(keys, NAMES) is None
        got = _extract(tmp_path, images)  # recomputed and stored again
    assert not _warnings(caplog)
    monkeypatch.setattr(fc, "read_entry", read)
    for stage in LAYERS:
        assert torch.equal(got[stage], want[stage])

    stop = threading.Event()
    errors: list[BaseException] = []

    def remover(clear: bool) -> None:
        try:
            while not stop.is_set():
                fc.clear(tmp_path) if clear else fc.trim(tmp_path, 0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=remover, args=(i % 2 == 0,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(5):
            got = _extract(tmp_path, images)
            for stage in LAYERS:
                assert torch.equal(got[stage], want[stage])
    finally:
        stop.set()
        for t in threads:
            t.join()
    # a writer whose folder a clear in a tight loop removes at every retry gives up on that
    # entry with a warning (the cache only saves time); nothing else may be reported
    assert not errors
    assert all("cannot write" in w and "No such file" in w for w in _warnings(caplog))


def test_a_write_whose_folder_vanished_is_retried(tmp_path: Path, caplog, no_memo,
                                                  monkeypatch):
    """A concurrent clear removing an entry's folder between its creation and the write
    (ENOENT, as the atomic writer reports it) is retried, not a warning."""
    import errno

    from anomaly_bench.backbones import cache as fc
    from anomaly_bench.fsutil import WriteError

    write = fc.write_entry
    failed: list[Path] = []

    def vanished_once(path, *args, **kwargs):
        if not failed:
            failed.append(path)
            raise WriteError(errno.ENOENT, "No such file or directory", str(path))
        return write(path, *args, **kwargs)

    monkeypatch.setattr(fc, "write_entry", vanished_once)
    images = _images()[:2]
    with caplog.at_level(logging.WARNING, logger="anomaly_bench"):
        _extract(tmp_path, images)
    assert failed and not _warnings(caplog)
    cache = _extractor(tmp_path).cache
    assert all(cache._path(content_key(img)).is_file() for img in images)


@pytest.mark.parametrize("memo", [True, False])
def test_written_entries_leave_the_page_cache_only_when_the_memo_holds_them(
        tmp_path: Path, monkeypatch, memo):
    """An entry the memo keeps is written back and dropped from the page cache (a second
    copy of the same bytes in memory); one it does not keep stays there for the jobs that
    read it back, unless memory is short. Either way the file holds the entry."""
    from anomaly_bench.backbones import cache as fc
    from anomaly_bench.memo import MEMO

    write, drop, released, dropped = fc.write_entry, fc.drop_cached, [], []

    def recorded(path, tensors, release=False):
        released.append(release)
        return write(path, tensors, release=release)

    def dropping(paths):
        dropped.extend(paths)
        drop(paths)

    monkeypatch.setattr(fc, "write_entry", recorded)
    monkeypatch.setattr(fc, "drop_cached", dropping)
    monkeypatch.setattr(fc, "_memory_short", lambda: False)
    budget = MEMO.budget
    MEMO.clear()
    MEMO.configure(2**30 if memo else 0)
    try:
        images = _images()[:2]
        first = _extract(tmp_path, images)
        MEMO.clear()  # the second extraction reads the files
        again = _extract(tmp_path, images)
    finally:
        MEMO.clear()
        MEMO.configure(budget)
    assert released == [memo, memo]
    entries = {_extractor(tmp_path).cache._path(content_key(img)) for img in images}
    assert set(dropped) == (entries if memo else set())
    for stage in LAYERS:
        assert torch.equal(again[stage], first[stage])


def test_clear_command_removes_cache_entries_and_nothing_else(tmp_path: Path, capsys):
    import subprocess
    import sys

    from anomaly_bench.cache_cli import main

    _, _, paths = _populate(tmp_path)
    size = sum(p.stat().st_size for p in paths)
    stale = paths[0].parent / f".{paths[0].name}.x.tmp"  # left by a stopped writer
    stale.write_bytes(b"partial")
    os.utime(stale, (stale.stat().st_mtime - 120,) * 2)
    busy = paths[1].parent / f".{paths[1].name}.y.tmp"  # a writer is filling it now
    busy.write_bytes(b"partial")
    foreign = [tmp_path / "notes.txt", paths[0].parent / "other.bin"]
    for f in foreign:
        f.write_text("keep me")
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out == (f"{tmp_path.resolve()}: 2 entries, "
                                       f"{size / 2**20:.1f} MiB\n")
    assert main(["--clear", str(tmp_path)]) == 0
    assert capsys.readouterr().out == (f"removed 2 entries ({size / 2**20:.1f} MiB) and 1 "
                                       f"temp files from {tmp_path.resolve()}\n")
    assert not any(p.exists() for p in paths) and not stale.exists() and busy.exists()
    assert all(f.exists() for f in foreign)
    done = subprocess.run([sys.executable, "-m", "anomaly_bench.cache_cli", "--clear",
                           str(tmp_path)], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("removed 0 entries") and not done.stderr


# --- features read in part ---------------------------------------------------------------

READ = {"layer1": torch.tensor([0, 5, 17, 40, 63]), "layer2": torch.tensor([3, 64, 127])}


def _read_only(root: Path | None, read: dict):
    ex = _extractor(root)
    ex.read_only(read)
    return ex


def test_read_only_gives_the_chosen_channels_from_every_source(tmp_path: Path, caplog):
    """The network, the memo and the files give the same chosen channels; the memo holds
    only those (of every block of the stages read), the files whole blocks, and a reader
    of other channels gets them from the files."""
    from anomaly_bench.backbones import cache as feature_cache
    from anomaly_bench.backbones.cache import flush_writes, read_entry, reset_stats
    from anomaly_bench.memo import MEMO

    images = _images()
    whole = _extract(None, images)
    want = {f: whole[f].index_select(1, i) for f, i in READ.items()}
    budget = MEMO.budget
    MEMO.configure(2**30)
    MEMO.clear()
    try:
        got = {}
        with torch.inference_mode():
            got["network"] = _read_only(None, READ)(images)
            reset_stats()
            ex = _read_only(tmp_path, READ)
            got["backbone, stored"] = ex(images)
            flush_writes()
            got["memo"] = _read_only(tmp_path, READ)(images)
            held = {k[3]: v for k, (v, _, _) in MEMO._items.items() if k[0] == "features"}
            MEMO.clear()
            got["files"] = _read_only(tmp_path, READ)(images)
            stats = feature_cache.STATS
            assert (stats.computed, stats.memory, stats.disk) == (4, 4, 4)
            other = {"layer1": torch.tensor([1, 2]), "layer2": torch.tensor([0])}
            got_other = _read_only(tmp_path, other)(images)
            assert stats.disk == 8  # other channels: not in the memo, read from the files
    finally:
        MEMO.clear()
        MEMO.configure(budget)
    for source, feats in got.items():
        for f in READ:
            assert feats[f].shape[1] == len(READ[f]), source
            assert torch.equal(feats[f], want[f]), source
    for f, i in other.items():
        assert torch.equal(got_other[f], whole[f].index_select(1, i))
    # every block of ResNet18's layer1 and layer2 ran, each kept with the channels read
    assert {n: t.shape[1] for n, t in held.items()} == {
        "layer1.0": 5, "layer1.1": 5, "layer2.0": 3, "layer2.1": 3}
    assert ex.memo_blocks() == {"layer1.0": (5, 4), "layer1.1": (5, 4), "layer2.0": (3, 8),
                                "layer2.1": (3, 8)}
    entry = read_entry(ex.cache._path(content_key(images[0])), ["layer1.1", "layer2.0"])
    assert entry["layer1.1"].shape[-1] == 64 and entry["layer2.0"].shape[-1] == 128
    # what is derived from a part is named apart from what is derived from whole blocks
    assert got["memo"].sources["layer1"] != _extract(tmp_path, images).sources["layer1"]


@pytest.mark.parametrize("bad", [torch.tensor([3, 1]), torch.tensor([1, 1]),
                                 torch.tensor([0, 64]), torch.tensor([-1, 2]),
                                 torch.tensor([]), torch.tensor([0.0, 1.0])])
def test_read_only_refuses_indices_that_are_not_sorted_distinct_channels(bad):
    with pytest.raises(ValueError, match="layer1"):
        _read_only(None, {"layer1": bad})
