"""anomaly-bench-prefetch against a loopback HTTP server standing in for the Hugging Face
hub and a weights URL; then runs without network read what it stored."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import FAST, black_hole_network, make_mvtec, network_events, run_cli
from http_helpers import serve

pytestmark = pytest.mark.slow

HF_FILE = "/timm/resnet18.tv_in1k/resolve/main/model.safetensors"
URL_FILE = "/weights/r18.pth"


def _resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("resnet18", pretrained=False)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _files() -> tuple[dict[str, bytes], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from safetensors.torch import save

    hub, url = _resnet18_state(1), _resnet18_state(2)
    buf = io.BytesIO()
    torch.save(url, buf)
    return {HF_FILE: save(hub), URL_FILE: buf.getvalue()}, hub, url


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_HOME", "TORCH_HOME", "HF_HUB_CACHE")}
    return {**env, "HF_HOME": str(cache / "huggingface"), "TORCH_HOME": str(cache / "torch"),
            "PYTHONWARNINGS": "ignore", **extra}


CHECK = """
import sys, torch
from anomaly_bench.backbones.extractor import create_timm_model
model, tag = create_timm_model("resnet18", "tv_in1k", True, None, 0, shared=False,
                               url=sys.argv[1] or None)
print(tag, float(model.conv1.weight.double().sum()))
"""


def test_prefetch_then_offline_runs_read_the_cache(tmp_path):
    files, hub_state, url_state = _files()
    cache = tmp_path / "cache"
    with serve(files) as server:
        url = server.url + URL_FILE
        cmd = [sys.executable, "-m", "anomaly_bench.prefetch", "--cache-dir", str(cache), "-m",
               "backbone=resnet18", f"+backbone.weights_url=null,{url}", "seed=0,1"]
        env = _env(tmp_path / "elsewhere", HF_ENDPOINT=server.url)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "4 job(s), 2 distinct backbone weight(s)" in done.stdout
        assert "timm:resnet18.tv_in1k ->" in done.stdout and f"{url} ->" in done.stdout
        assert f"export HF_HOME={cache / 'huggingface'}" in done.stdout
        assert sorted(p for m, p, _ in server.requests if m == "GET" and p in files) == [
            HF_FILE, URL_FILE]
        # a second prefetch finds both in the cache and downloads nothing
        n = len(server.requests)
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert not [r for r in server.requests[n:] if r[0] == "GET" and r[1] in files]

    # no network from here on: the weights come from the cache, equal to the served ones
    offline = _env(cache, HF_HUB_OFFLINE="1")
    net_env, net_log = black_hole_network(tmp_path / "net")
    for source, state in (("", hub_state), (url, url_state)):
        out = subprocess.run([sys.executable, "-c", CHECK, source],
                             env={**offline, **net_env}, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        tag, total = out.stdout.split()
        assert tag == ("timm:resnet18.tv_in1k" if not source else "url:r18.pth")
        assert float(total) == pytest.approx(float(state["conv1.weight"].double().sum()))
    assert network_events(net_log) == []

    root = make_mvtec(tmp_path / "mvtec", categories=("bottle",))
    res = run_cli([*[a for a in FAST if a != "backbone.pretrained=false"], "dataset=mvtec",
                   f"dataset.root={root}", "plots.enabled=false"], tmp_path / "run",
                  fast=False, env={**offline, **net_env})
    assert res.code == 0, res.stderr[-3000:]
    assert res.rows()[0]["weights"] == "timm:resnet18.tv_in1k"
    assert network_events(net_log) == []


def test_offline_without_the_cache_names_prefetch(tmp_path):
    with serve({}) as server:
        env = _env(tmp_path / "empty", HF_HUB_OFFLINE="1")
        out = subprocess.run([sys.executable, "-c", CHECK, server.url + URL_FILE], env=env,
                             capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "HF_HUB_OFFLINE=1 and" in out.stderr and "anomaly-bench-prefetch" in out.stderr


def test_prefetch_refuses_offline_mode_and_lists_a_dry_run(tmp_path):
    cmd = [sys.executable, "-m", "anomaly_bench.prefetch", "experiment=padim_screw_layers"]
    out = subprocess.run(cmd, env=_env(tmp_path, HF_HUB_OFFLINE="1"), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and "HF_HUB_OFFLINE=1 is set" in out.stderr
    out = subprocess.run([*cmd, "--dry-run", "backbone=resnet18,wide_resnet50_2"],
                         env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "144 job(s), 2 distinct backbone weight(s)" in out.stdout
    assert "backbone: timm:resnet18.tv_in1k" in out.stdout
    assert "backbone: timm:wide_resnet50_2.tv_in1k" in out.stdout
