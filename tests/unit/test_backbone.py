"""Block selection, weights loading and fail-fast pretrained fetching of the extractor."""

import os
import socket

import pytest
import torch

from anomaly_bench.backbones import FeatureExtractor, weights
from anomaly_bench.backbones.weights import read_state_dict
from anomaly_bench.errors import ConfigError, WeightsError


@pytest.fixture(scope="module")
def r18():
    return FeatureExtractor("resnet18", {"layer1": 0, "layer2": -1, "layer3": 1},
                            hub_tag="tv_in1k", pretrained=False, seed=3)


def test_selected_tensor_is_that_blocks_output(r18):
    import timm

    torch.manual_seed(3)  # the extractor's seeded init: the very same weights
    ref = timm.create_model("resnet18.tv_in1k", pretrained=False, zero_init_last=False).eval()
    torch.testing.assert_close(ref.layer3[1].conv2.weight, r18.stages["layer3"][1].conv2.weight)
    seen = {}
    hooks = [ref.layer1[0].register_forward_hook(lambda m, i, o: seen.__setitem__("layer1", o)),
             ref.layer2[1].register_forward_hook(lambda m, i, o: seen.__setitem__("layer2", o)),
             ref.layer3[1].register_forward_hook(lambda m, i, o: seen.__setitem__("layer3", o))]
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref(x)
        out = r18(x)
    for h in hooks:
        h.remove()
    assert list(out) == ["layer1", "layer2", "layer3"]
    for stage in out:
        torch.testing.assert_close(out[stage], seen[stage])
    assert r18.tag == "layer1.0+layer2.1+layer3.1"
    assert r18.channels == {"layer1": 64, "layer2": 128, "layer3": 256}


def test_truncated_network_drops_unused_stages_and_stops_early():
    small = FeatureExtractor("resnet18", {"layer2": 0}, pretrained=False, seed=0)
    assert list(small.stages) == ["layer1", "layer2"]
    calls = []
    small.stages["layer2"][1].register_forward_hook(lambda *a: calls.append(1))
    with torch.inference_mode():
        small(torch.randn(1, 3, 32, 32))
    assert calls == []  # the block after the selected one never runs
    full = FeatureExtractor("resnet18", {"layer2": 0}, pretrained=False, seed=0, truncate=False)
    assert list(full.stages) == ["layer1", "layer2", "layer3", "layer4"]
    with torch.inference_mode():
        torch.testing.assert_close(full(torch.ones(1, 3, 32, 32))["layer2"],
                                   small(torch.ones(1, 3, 32, 32))["layer2"])


def test_feature_cache_serves_other_blocks_of_the_same_images(tmp_path):
    from anomaly_bench.backbones.cache import FeatureCache
    from anomaly_bench.memo import MEMO

    x = torch.randn(3, 3, 64, 64)
    first = FeatureExtractor("resnet18", {"layer1": 0, "layer2": -1}, pretrained=False, seed=0)
    first.attach_cache(FeatureCache(tmp_path, first.backbone_id))
    with torch.inference_mode():
        first(x)
    assert first.cache.misses == 3 and first.cache.hits == 0
    other = FeatureExtractor("resnet18", {"layer1": 1, "layer2": 0}, pretrained=False, seed=0)
    with torch.inference_mode():
        expected = other(x)
    other.attach_cache(FeatureCache(tmp_path, other.backbone_id))
    other.stem = None  # a cache hit must not touch the network
    MEMO.clear()  # read the entries back from disk, not from the process memo
    with torch.inference_mode():
        got = other(x)
    assert other.cache.hits == 3
    for stage in expected:
        torch.testing.assert_close(got[stage], expected[stage])
    seeded = FeatureExtractor("resnet18", {"layer1": 1}, pretrained=False, seed=1)
    cache = FeatureCache(tmp_path, seeded.backbone_id)
    assert cache.dir != other.cache.dir  # other weights, other cache folder


def test_random_init_is_seeded_and_tagged():
    a = FeatureExtractor("resnet18", {"layer1": -1}, pretrained=False, seed=5)
    b = FeatureExtractor("resnet18", {"layer1": -1}, pretrained=False, seed=5)
    c = FeatureExtractor("resnet18", {"layer1": -1}, pretrained=False, seed=6)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(a(x)["layer1"], b(x)["layer1"])
        assert not torch.equal(a(x)["layer1"], c(x)["layer1"])
    assert a.weights_tag == "random(seed=5)"


def test_out_of_range_block_is_a_config_error():
    with pytest.raises(ConfigError, match=r"layers.layer2=4 .* 2 blocks"):
        FeatureExtractor("resnet18", {"layer2": 4}, pretrained=False)
    with pytest.raises(ConfigError, match="selects no stage"):
        FeatureExtractor("resnet18", {"layer1": None}, pretrained=False)


@pytest.mark.parametrize("style", ["torchvision", "timm_prefixed", "safetensors"])
def test_local_weights_file_loads(tmp_path, style):
    import timm

    torch.manual_seed(11)
    src = timm.create_model("resnet18", pretrained=False)
    state = src.state_dict()
    if style == "torchvision":
        path = tmp_path / "resnet18-f37072fd.pth"
        torch.save(state, path)
    elif style == "timm_prefixed":
        path = tmp_path / "ckpt.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    fe = FeatureExtractor("resnet18", {"layer1": -1}, weights=str(path), seed=0)
    torch.testing.assert_close(fe.stem[0].weight, state["conv1.weight"])
    assert fe.weights_tag.startswith(f"file:{path.name}#")
    assert read_state_dict(path)["conv1.weight"].shape == (64, 3, 7, 7)


def test_bad_weights_files_raise_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        FeatureExtractor("resnet18", {"layer1": -1}, weights=str(tmp_path / "nope.pth"))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="missing"):
        FeatureExtractor("resnet18", {"layer1": -1}, weights=str(tmp_path / "wrong.pth"))


def test_unreachable_hub_fails_fast_with_offline_options(monkeypatch, tmp_path):
    """A black-holed hub costs one probe with the bounded time-out, and no download."""
    import timm

    monkeypatch.setenv("HF_HOME", str(tmp_path))  # empty cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")
    connects, downloads = [], []

    def connect(sock, address):  # every TCP connection attempt of the process
        connects.append((address, sock.gettimeout()))
        raise TimeoutError("timed out")  # packets dropped: the slow case a probe must bound

    real_create = timm.create_model

    def create_model(*args, **kwargs):
        if kwargs.get("pretrained"):
            downloads.append(args)
        return real_create(*args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(timm, "create_model", create_model)
    with pytest.raises(WeightsError) as err:
        FeatureExtractor("resnet18", {"layer1": -1}, hub_tag="tv_in1k", pretrained=True)
    assert connects == [(("127.0.0.1", 9), weights.PROBE_TIMEOUT_S)]
    assert 0 < weights.PROBE_TIMEOUT_S <= 10
    assert downloads == []  # the failed probe stops before timm or the HF client start
    assert "127.0.0.1 is not reachable" in str(err.value)
    assert "backbone.weights=PATH" in str(err.value)
    assert "backbone.pretrained=false" in str(err.value)


def test_hub_access_bounds_hf_client_and_goes_offline_when_cached(monkeypatch):
    probes = []
    monkeypatch.setattr(weights, "_host_reachable", lambda url: probes.append(url) or True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_ETAG_TIMEOUT", raising=False)
    monkeypatch.delenv("HF_HUB_DOWNLOAD_TIMEOUT", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(weights, "hub_cached", lambda hf_id: False)
    with weights.hub_access("resnet18.tv_in1k", "timm/resnet18.tv_in1k", None):
        # reachable, not cached: the download runs with short HF client time-outs
        assert os.environ["HF_HUB_ETAG_TIMEOUT"] == "10"
        assert os.environ["HF_HUB_DOWNLOAD_TIMEOUT"] == "30"
        assert "HF_HUB_OFFLINE" not in os.environ
    assert probes == ["https://hub.invalid"]
    assert "HF_HUB_ETAG_TIMEOUT" not in os.environ  # restored on exit
    monkeypatch.setattr(weights, "hub_cached", lambda hf_id: True)
    with weights.hub_access("resnet18.tv_in1k", "timm/resnet18.tv_in1k", None):
        assert os.environ["HF_HUB_OFFLINE"] == "1"  # cached: no network at all
    assert probes == ["https://hub.invalid"]  # and no probe either
    assert "HF_HUB_OFFLINE" not in os.environ
