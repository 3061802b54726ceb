"""The memory a configuration needs, estimated from its shapes before any image is read.

A run that cannot fit in memory would otherwise read and fit for minutes and end in an
out-of-memory traceback (or the kernel's OOM killer). The estimate adds what certainly
exists at once, in float32: one batch of input images (``batch_size`` x 3 x H x W), the
backbone's selected feature maps of that batch (channels and stride of each, from the
backbone itself), what the method holds while fitting (its own estimate from the training
set's size and the feature shapes, :meth:`~anomaly_bench.methods.AnomalyMethod.fit_bytes`)
and the anomaly maps of every test image, kept until the metrics are computed. It leaves
out what depends on the kernels (intermediate activations, workspaces), so it is a lower
bound: a configuration refused by it cannot run on the machine.

The machine's memory is ``MemAvailable`` on the CPU (what can be allocated without
swapping) and the free memory of the CUDA device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from anomaly_bench.errors import ConfigError
from anomaly_bench.memo import host_available, host_total

FLOAT = 4  # bytes of a float32


@dataclass(frozen=True)
class Footprint:
    """Bytes a run holds at once, by what holds them."""

    inputs: int
    features: int
    method: int
    maps: int

    @property
    def total(self) -> int:
        return self.inputs + self.features + self.method + self.maps


def feature_shapes(channels: Mapping[str, int], strides: Mapping[str, int],
                   size: tuple[int, int]) -> dict[str, tuple[int, int, int]]:
    """``{name: (C, h, w)}`` of the backbone's selected features for an (H, W) input."""
    h, w = size
    return {n: (int(c), max(1, h // int(strides[n])), max(1, w // int(strides[n])))
            for n, c in channels.items()}


def estimate(shapes: Mapping[str, tuple[int, int, int]], size: tuple[int, int],
             batch_size: int, method_bytes: int, n_test: int, masks: bool) -> Footprint:
    """The :class:`Footprint` of one batch of ``size`` (H, W) images giving ``shapes``,
    the method's ``method_bytes`` and the maps (and masks) of ``n_test`` test images."""
    h, w = size
    per_map = h * w * (FLOAT + (1 if masks else 0))
    return Footprint(
        inputs=batch_size * 3 * h * w * FLOAT,
        features=batch_size * sum(c * fh * fw for c, fh, fw in shapes.values()) * FLOAT,
        method=int(method_bytes), maps=n_test * per_map)


def machine_memory(device: torch.device) -> tuple[int | None, int | None]:
    """(available, total) bytes of ``device``'s memory (None where unknown)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    return host_available(), host_total()


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**27 else f"{n / 2**20:.0f} MiB"


def check(fp: Footprint, device: torch.device, why: Mapping[str, str]) -> None:
    """ConfigError when ``fp`` exceeds the available memory of ``device``, naming each
    part with the keys that set it (``why``: part -> what sets it)."""
    available, total = machine_memory(device)
    if available is None or fp.total <= available:
        return
    parts = [(fp.inputs, "inputs"), (fp.features, "features"), (fp.method, "method"),
             (fp.maps, "maps")]
    listed = "; ".join(f"{_gib(n)} {why[k]}" for n, k in sorted(parts, reverse=True) if n)
    machine = f"{_gib(available)} available" + (f" of {_gib(total)}" if total else "")
    raise ConfigError(
        f"this configuration needs at least {_gib(fp.total)} of memory on {device}, more "
        f"than the {machine}: {listed}. Lower the keys named (resolution.size and "
        "resolution.crop, batch_size first), select fewer or earlier layers, or run on a "
        "machine with more memory."
    )
