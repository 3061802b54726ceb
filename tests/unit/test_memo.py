"""The process memo: LRU by bytes, and what the jobs of one sweep share through it."""

import os

import pytest
import torch

from anomaly_bench.memo import MEMO, Memo, derive, known, nbytes


@pytest.fixture(autouse=True)
def fresh_memo(monkeypatch):
    """An empty process memo with room, on a host that is not short of memory."""
    monkeypatch.setattr("anomaly_bench.memo.host_available", lambda: None)
    MEMO.clear()
    MEMO.configure(1 << 30)
    yield
    MEMO.clear()


def test_lru_evicts_least_recent_by_bytes():
    memo = Memo(budget=3 * 400)
    for k in "abc":
        memo.put(k, torch.zeros(100))  # 400 bytes each
    assert memo.get("a") is not None  # a is now the most recent
    memo.put("d", torch.zeros(100))
    assert memo.get("b") is None and memo.get("a") is not None and memo.get("d") is not None
    assert not memo.put("huge", torch.zeros(1000))  # larger than the whole budget: not kept
    assert memo.get("huge") is None and memo.size <= memo.budget
    assert memo.put("e", torch.zeros(100))  # put says whether it kept the value
    memo.configure(0)
    assert memo.size == 0 and memo.get("a") is None


def test_small_entries_outlive_larger_ones():
    """An entry worth little memory and costly to redo (an alignment's decisions) is
    evicted only after every larger one."""
    memo = Memo(budget=3 * 2**20)
    memo.put("align", {"turns": {"a.png": 1}})  # no tensors
    for k in "abcd":
        memo.put(k, torch.zeros(2**18))  # 1 MiB each
    assert memo.get("align") is not None
    assert memo.get("a") is None and memo.get("d") is not None
    memo.configure(2**10)
    assert memo.get("d") is None and memo.get("align") is not None
    memo.configure(0)
    assert memo.get("align") is None and memo.size == 0


def test_values_with_a_copy_elsewhere_are_evicted_first():
    """Block outputs the feature cache also holds in files go before statistics that
    would have to be recomputed, however recently they were used."""
    memo = Memo(budget=3 * 2**20)
    memo.put("stats", torch.zeros(2**18))  # 1 MiB each
    memo.put("features", torch.zeros(2**18), spill=True)
    memo.put("more stats", torch.zeros(2**18))
    assert memo.get("features") is not None  # now the most recently used
    memo.put("new stats", torch.zeros(2**18))
    assert memo.get("features") is None
    assert all(memo.get(k) is not None for k in ("stats", "more stats", "new stats"))


def test_memo_gives_memory_back_when_the_host_is_short():
    available = [10 * 2**20]
    memo = Memo(budget=2**30, available=lambda: available[0], reserve=4 * 2**20)
    for k in "abc":
        memo.put(k, torch.zeros(2**18))  # 1 MiB each, the host has room
    assert memo.size == 3 * 2**20 and memo.shed_bytes == 0
    available[0] = 2 * 2**20 + 100  # just under 2 MiB short of the reserve
    memo.put("d", torch.zeros(2**18))
    assert memo.get("a") is None and memo.get("b") is None  # the two least recent
    assert memo.get("c") is not None and memo.get("d") is not None
    assert memo.shed_bytes == 2 * 2**20
    available[0] = 0  # more than the memo holds: it empties and keeps nothing new
    memo.put("e", torch.zeros(2**18))
    assert memo.size == 0 and memo.get("e") is None and memo.declined == 1
    available[0] = None  # unknown: only the budget bounds it
    memo.put("f", torch.zeros(2**18))
    assert memo.get("f") is not None


def test_get_or_compute_computes_once():
    memo, calls = Memo(), []
    for _ in range(3):
        out = memo.get_or_compute("k", lambda: calls.append(1) or {"x": torch.ones(4)})
    assert calls == [1] and torch.equal(out["x"], torch.ones(4))
    assert nbytes({"x": torch.ones(4), "y": [torch.ones(2, dtype=torch.float64)]}) == 32


def test_loaded_samples_are_decoded_once_and_follow_file_changes(make_dataset, monkeypatch):
    from fixtures import preprocess

    import anomaly_bench.data.loading as loading
    from anomaly_bench.data import get_layout

    root = make_dataset("mvtec")
    split = get_layout("mvtec").split(root, "bottle")
    reads = []
    original = loading.read_image
    monkeypatch.setattr(loading, "read_image", lambda p: reads.append(p) or original(p))
    ds = loading.RecordDataset(split.test, preprocess(size=32, crop=None))
    first = [ds[i] for i in range(len(ds))]
    again = [ds[i] for i in range(len(ds))]
    assert len(reads) == len(ds)  # the second pass decoded nothing
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    other = loading.RecordDataset(split.test, preprocess(size=16, crop=None))
    assert other[0]["image"].shape[-1] == 16  # another preprocessing is another entry
    path = split.test[0].image_path
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file "changed"
    ds[0]
    assert reads[-1] == path


def test_padim_block_statistics_are_shared_and_exact(tmp_path):
    """Two PaDiM jobs that share blocks (as a layer sweep does) reuse each block's
    statistics from the memo and score exactly as a run without cache or memo."""
    from anomaly_bench.methods import build_method
    from anomaly_bench.types import Batch

    gen = torch.Generator().manual_seed(0)
    train = torch.randn(12, 3, 64, 64, generator=gen)
    test = torch.randn(5, 3, 64, 64, generator=gen)

    def batch(x):
        n = x.shape[0]
        return Batch(images=x, labels=torch.zeros(n, dtype=torch.long),
                     paths=[str(i) for i in range(n)], defect_types=["good"] * n)

    def run(layers, cache: bool):
        backbone = {"name": "resnet18", "pretrained": False,
                    "cache": {"enabled": cache, "dir": str(tmp_path / "cache")}}
        model = build_method({"name": "padim", "n_features": 40}, backbone,
                             {"layer1": layers[0], "layer2": layers[1], "layer3": None}, seed=0)
        model.fit([batch(train[:7]), batch(train[7:])])
        return model.predict(batch(test))

    plain = run((0, 1), cache=False)
    assert MEMO.size == 0  # nothing to key statistics on without the feature cache
    cached = run((0, 1), cache=True)
    torch.testing.assert_close(cached.anomaly_maps, plain.anomaly_maps, rtol=1e-6, atol=1e-6)
    hits = MEMO.hits
    other = run((0, 0), cache=True)  # shares layer1.0 with the run before
    assert MEMO.hits >= hits + 2  # its layer1 fit statistics and test shares came from memory
    kinds = {key[0] for key in MEMO._items if isinstance(key, tuple) and isinstance(key[0], str)}
    assert {"padim.level_stats", "padim.level_cross"} <= kinds
    reference = run((0, 0), cache=False)
    torch.testing.assert_close(other.anomaly_maps, reference.anomaly_maps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(other.image_scores, reference.image_scores, rtol=1e-6, atol=1e-6)


def test_values_on_an_accelerator_are_not_kept():
    memo = Memo()
    meta = torch.zeros(4, device="meta")  # stands for any non-CPU device
    memo.put("dev", {"x": meta})
    memo.put("host", {"x": torch.zeros(4)})
    assert memo.get("dev") is None and memo.get("host") is not None


@pytest.mark.parametrize(("value", "sweep", "gib"), [("auto", False, 0), (1.5, False, 1.5),
                                                      (0, True, 0), (2, True, 2)])
def test_runner_sets_the_budget_from_memory_cache_gb(tmp_path, value, sweep, gib):
    from fixtures import compose_config

    from anomaly_bench.runner import Runner

    Runner(compose_config(["device=cpu", f"memory_cache_gb={value}"]), tmp_path, sweep=sweep)
    assert MEMO.budget == int(gib * 2**30)


def test_auto_in_a_sweep_keeps_the_memo_until_the_job_is_sized(tmp_path):
    """A sweep job with memory_cache_gb=auto leaves what earlier jobs memoised in place
    when it starts; its fit sizes the budget (anomaly_bench/memo_budget.py)."""
    from fixtures import compose_config

    from anomaly_bench.runner import Runner

    MEMO.configure(3 * 2**20)
    MEMO.put("earlier job", torch.zeros(1000))
    Runner(compose_config(["device=cpu", "memory_cache_gb=auto"]), tmp_path, sweep=True)
    assert MEMO.budget == 3 * 2**20 and MEMO.get("earlier job") is not None


def test_runner_rejects_a_bad_budget(tmp_path):
    from fixtures import compose_config

    from anomaly_bench.errors import ConfigError
    from anomaly_bench.runner import Runner

    with pytest.raises(ConfigError, match="memory_cache_gb='lots'"):
        Runner(compose_config(["device=cpu", "memory_cache_gb=lots"]), tmp_path)


def test_derive_memoises_only_values_of_known_content():
    """A value derived from inputs of known content is computed on first use and then
    taken from the memo; with an input of unknown content it is computed at once and
    nothing is kept."""
    calls = []

    def total(xs, scale):
        calls.append(scale)
        return torch.stack(xs).sum() * scale

    a, b = torch.ones(3), torch.full((3,), 2.0)
    plain = derive("test.total", total, [known(a), known(b, "b")], scale=2.0)
    assert plain.key is None and calls == [2.0] and plain.value.item() == 18.0
    assert MEMO.size == 0
    lazy = derive("test.total", total, [known(a, "a"), known(b, "b")], scale=2.0)
    assert calls == [2.0]  # not computed before it is needed
    assert lazy.value.item() == 18.0 and calls == [2.0, 2.0]
    again = derive("test.total", total, [known(a, "a"), known(b, "b")], scale=2.0)
    assert again.key == lazy.key and again.value.item() == 18.0 and calls == [2.0, 2.0]
    other = derive("test.total", total, [known(a, "a"), known(b, "b")], scale=3.0)
    assert other.key != lazy.key and other.value.item() == 27.0
    renamed = derive("test.other", total, [known(a, "a"), known(b, "b")], scale=2.0)
    assert renamed.key != lazy.key


def test_derive_keys_tensor_parameters_by_value_and_skips_inputs_of_kept_values():
    calls = []

    def pick(x, index):
        calls.append(1)
        return x[index]

    x = known(torch.arange(10.0), "x")
    picked = derive("test.pick", pick, x, index=torch.tensor([1, 3]))
    summed = derive("test.sum", lambda t: t.sum(), picked)
    assert summed.value.item() == 4.0 and len(calls) == 1
    again = derive("test.sum", lambda t: t.sum(),
                   derive("test.pick", pick, x, index=torch.tensor([1, 3])))
    assert again.value.item() == 4.0 and len(calls) == 1  # from the memo: no pick
    moved = derive("test.pick", pick, x, index=torch.tensor([1, 4]))
    assert moved.key != picked.key  # tensor parameters are keyed by value
    assert moved.value.tolist() == [1.0, 4.0] and len(calls) == 2


def test_a_known_value_modified_in_place_loses_its_key():
    t = torch.zeros(4)
    value = known((t,), "fitted")
    assert value.key == "fitted"
    t.copy_(torch.ones(4))  # e.g. a checkpoint loaded into fitted buffers
    assert value.key is None
    assert derive("test.sum", lambda v: v[0].sum(), value).key is None


def test_batches_of_kept_samples_carry_their_content_keys(make_dataset, monkeypatch):
    """A kept sample holds its image's content key; the batch of such samples carries
    them (also once moved), so the feature cache finds its entries without hashing; a
    batch modified in place is hashed again."""
    from fixtures import preprocess

    import anomaly_bench.data.loading as loading
    import anomaly_bench.memo as memo_module
    from anomaly_bench.data import get_layout

    root = make_dataset("mvtec")
    split = get_layout("mvtec").split(root, "bottle")
    hashed = []
    original = memo_module.content_key
    monkeypatch.setattr(memo_module, "content_key", lambda t: hashed.append(1) or original(t))
    monkeypatch.setattr(loading, "content_key", memo_module.content_key)

    def batches():
        return list(loading.make_loader(split.test, preprocess(size=32, crop=None), 3, 0))

    first = batches()
    assert len(hashed) == len(split.test)  # each image hashed once, when it was kept
    again = batches()
    want = [original(row) for b in again for row in b.images]
    hashed.clear()
    assert [k for b in again for k in memo_module.row_keys(b.images)] == want
    assert hashed == []  # the feature cache hashes nothing
    moved = again[0].to("meta")
    assert memo_module.attached_row_keys(moved.images) == tuple(want[:3])
    again[0].images.mul_(2)  # modified in place: its old keys no longer name it
    assert memo_module.row_keys(again[0].images) == [original(r) for r in again[0].images]
    assert first[0].images is not again[0].images  # each job still gets its own batch
    MEMO.configure(0)  # a single run keeps nothing and hashes nothing ahead
    MEMO.clear()
    hashed.clear()
    batches()
    assert hashed == []
