"""The on-disk feature cache: racing writers, readers in a fresh process, and entries that
must not be used (damaged, truncated, empty, of another shape or format)."""

import json
import logging
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch

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
    from anomaly_bench.backbones.cache import image_key

    images = _images()[:2]
    _extract(root, images)
    cache = _extractor(root).cache
    keys = [image_key(img) for img in images]
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
                                            "blake2b": tensor_digest(t)}
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
