"""The on-disk feature cache across processes: racing writers, readers in a fresh process."""

import multiprocessing as mp
from pathlib import Path

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
    assert len(files) == 4 and not [p for p in files if p.name.startswith(".tmp-")]
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
