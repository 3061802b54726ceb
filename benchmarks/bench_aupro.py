"""Time ``aupro`` on a realistic MVTec-sized category: N random-ish maps with blob masks.

Usage: ``python benchmarks/bench_aupro.py --n 100 --size 256 --device cpu``. Prints the
median of 3 timed calls (after one warm-up) and the AUPRO value.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from anomaly_bench.metrics import aupro


def make_data(n: int, size: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth noise maps, elliptic blob masks on 2 of 3 images, maps raised on the blobs."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, 1, size // 16, size // 16, generator=gen)
    maps = F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        if i % 3 == 0:
            continue
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            cy, cx = (torch.rand(2, generator=gen) * size).tolist()
            ry, rx = (4 + torch.rand(2, generator=gen) * size / 8).tolist()
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    maps = maps + 0.5 * masks * torch.rand(n, 1, 1, generator=gen)
    maps = maps + 0.05 * torch.rand(maps.shape, generator=gen)
    return maps.to(device), masks.to(device)


def main() -> None:
    """Parse arguments, build the data, time aupro and print the result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="number of maps")
    parser.add_argument("--size", type=int, default=256, help="map height and width")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (median shown)")
    args = parser.parse_args()

    maps, masks = make_data(args.n, args.size, args.device)
    sync = torch.cuda.synchronize if maps.is_cuda else (lambda: None)
    value = aupro(maps, masks)  # warm-up
    times = []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        value = aupro(maps, masks)
        sync()
        times.append(time.perf_counter() - start)
    print(f"aupro on {args.n}x{args.size}x{args.size} ({args.device}): "
          f"{statistics.median(times):.3f} s (median of {args.repeats}), value {value:.6f}")


if __name__ == "__main__":
    main()
