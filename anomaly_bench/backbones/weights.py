"""Where backbone weights come from: a model hub, a local file, or a seeded random init.

Every result records a ``weights`` tag produced here, so a table always says whether it
was computed with pretrained, local or random weights. Fetching from a hub fails within
seconds when the hub is unreachable, with a message that offers the offline options.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from anomaly_bench.errors import WeightsError

PROBE_TIMEOUT_S = 4.0
_STRIP_PREFIXES = ("module.", "model.", "backbone.", "feature_extractor.", "encoder.")


def random_tag(seed: int) -> str:
    """Tag of a seeded random initialisation."""
    return f"random(seed={seed})"


def file_tag(path: Path) -> str:
    """Tag of a local weights file: its name plus the start of its SHA-256."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return f"file:{path.name}#{digest.hexdigest()[:12]}"


def weights_tag(name: str, hub_tag: str | None, pretrained: bool, weights: str | None,
                seed: int, url: str | None = None, kind: str = "cnn",
                quick_gelu: bool = False) -> str:
    """The tag of the weights a backbone config asks for, without loading them.

    ``file:<name>#<sha256 start>`` for a local file (it wins), ``url:<file name>`` for
    weights published at a URL (MAE's), ``timm:<name>.<hub tag>`` for timm hub weights
    (``open_clip:<name>.<tag>`` for a CLIP backbone), ``random(seed=N)`` for a seeded
    random initialisation. ``+quick_gelu`` follows when a CLIP tower runs with QuickGELU
    (``backbone.quick_gelu``): the same weights compute other features with it.
    """
    return _source_tag(name, hub_tag, pretrained, weights, seed, url, kind) + (
        "+quick_gelu" if quick_gelu else "")


def _source_tag(name: str, hub_tag: str | None, pretrained: bool, weights: str | None,
                seed: int, url: str | None, kind: str) -> str:
    if weights:
        return file_tag(Path(weights).expanduser())
    if pretrained and url:
        return f"url:{Path(urlparse(url).path).name}"
    if pretrained:
        hub = "open_clip" if kind == "clip" else "timm"
        return f"{hub}:{name}.{hub_tag}" if hub_tag else f"{hub}:{name}"
    return random_tag(seed)


def url_cache_path(url: str) -> Path:
    """Where torch hub keeps the file published at ``url`` (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def fetch_state_dict(url: str, what: str) -> dict[str, torch.Tensor]:
    """The state dict published at ``url`` (torch hub's cache first, else a guarded download)."""
    cached = url_cache_path(url)
    if cached.is_file():
        return read_state_dict(cached)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise WeightsError(offline_message(what, f"HF_HUB_OFFLINE=1 and {cached} does not exist"))
    with hub_access(what, None, url):
        try:
            obj = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True,
                                                     progress=False)
        except Exception as exc:
            raise WeightsError(offline_message(what, f"{type(exc).__name__}: {exc}")) from exc
    return unwrap_state(obj, url)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, ``.pt``/``.pth``/``.bin`` (timm or torchvision).

    Checkpoints that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``) are
    unwrapped and common prefixes (``module.``, ``model.``, ``backbone.``) are removed.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(
            f"backbone.weights={path}: no such file. Expected a local state dict "
            "(.pth/.pt/.bin/.safetensors with timm or torchvision key names)."
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable file: say which and why
        raise WeightsError(
            f"backbone.weights={p}: cannot read it as a state dict ({type(exc).__name__}: {exc})."
        ) from exc
    return unwrap_state(obj, f"backbone.weights={p}")


def unwrap_state(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The parameter tensors of a loaded checkpoint object, under timm's key names.

    Checkpoints that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``) are
    unwrapped and common prefixes (``module.``, ``model.``, ``backbone.``) are removed.
    """
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            f"{source}: expected a mapping of parameter names to tensors, "
            f"found {type(obj).__name__}."
        )
    out: dict[str, torch.Tensor] = {}
    for name, tensor in obj.items():
        for prefix in _STRIP_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        out[name] = tensor
    return out


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``; every parameter the model keeps must be present.

    Classifier heads (``fc.``, ``head.``, ``classifier.``) are optional; shape mismatches
    and missing keys raise :class:`WeightsError` naming ``source``.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(
            f"{source}: {len(missing)} parameters of the backbone are missing from the file "
            f"(first: {', '.join(missing[:4])}). Expected timm or torchvision key names for "
            "this architecture."
        )
    bad = [k for k in own if k in state and state[k].shape != own[k].shape]
    if bad:
        k = bad[0]
        raise WeightsError(
            f"{source}: parameter {k} has shape {tuple(state[k].shape)} in the file but "
            f"{tuple(own[k].shape)} in the backbone; is it the right architecture?"
        )
    model.load_state_dict({k: state[k] for k in own if k in state}, strict=False)


def _host_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def hub_file(hf_hub_id: str | None) -> Path | None:
    """The weights file the Hugging Face cache holds for ``hf_hub_id``, or None."""
    if not hf_hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                     "open_clip_pytorch_model.bin"):
        hit = try_to_load_from_cache(hf_hub_id, filename)
        if isinstance(hit, str):
            return Path(hit)
    return None


def hub_cached(hf_hub_id: str | None) -> bool:
    """True when the Hugging Face cache already holds weights for ``hf_hub_id``."""
    return hub_file(hf_hub_id) is not None


def offline_message(what: str, detail: str) -> str:
    """The one-paragraph message shown when pretrained weights cannot be had."""
    return (
        f"cannot fetch pretrained weights for {what}: {detail}. Either fetch them first on a "
        "machine with network into the caches this one reads (anomaly-bench-prefetch with "
        "the same overrides; HF_HOME and TORCH_HOME name the caches), give a local file "
        "with backbone.weights=PATH (a timm or torchvision state dict, e.g. "
        "wide_resnet50_2-95faca4d.pth), or run with backbone.pretrained=false for a seeded "
        "random initialisation (results are then tagged random(seed=N) and are not "
        "comparable to published numbers)."
    )


@contextmanager
def hub_access(what: str, hf_hub_id: str | None, url: str | None):
    """Guard a hub download: fail fast when offline, read the cache without network.

    Inside the block the Hugging Face client runs offline when the weights are cached,
    and with short time-outs otherwise.
    """
    if hub_cached(hf_hub_id) or os.environ.get("HF_HUB_OFFLINE") == "1":
        with _env(HF_HUB_OFFLINE="1"):
            yield
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    probe = endpoint if hf_hub_id else (url or "")
    if not probe or not _host_reachable(probe):
        host = urlparse(probe).hostname or "the model hub"
        raise WeightsError(offline_message(what, f"{host} is not reachable from this machine"))
    with _env(HF_HUB_ETAG_TIMEOUT="10", HF_HUB_DOWNLOAD_TIMEOUT="30"):
        yield
