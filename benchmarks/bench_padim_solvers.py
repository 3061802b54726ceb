"""PaDiM fit and scoring: the low-rank (Woodbury) solver against the full covariance solver.

Both are exact; this prints their fit and per-image scoring times and the largest
difference between their distance maps on the same features. The default pyramid has
the shape of PaDiM's WRN50 embedding: d=550 channels drawn from layer1 (56x56), layer2
(28x28) and layer3 (14x14) in proportion to their widths (79 + 157 + 314). The full
solver works on the upsampled concatenation; the low-rank solver on each level's grid.

    python benchmarks/bench_padim_solvers.py --n-train 64 --dims 79 157 314 --grid 56
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from anomaly_bench.ops.gaussian import (
    GaussianAccumulator,
    lowrank_fit,
    lowrank_mahalanobis,
    mahalanobis,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--n-test", type=int, default=8)
    ap.add_argument("--dims", type=int, nargs="+", default=[79, 157, 314])
    ap.add_argument("--grid", type=int, default=56, help="finest grid; level i has grid/2^i")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    sizes = [args.grid // 2**i for i in range(len(args.dims))]

    def pyramid(n: int, scale: float) -> list[torch.Tensor]:
        return [(torch.randn(n, c, s, s, generator=gen) * scale).to(dev)
                for c, s in zip(args.dims, sizes, strict=True)]

    def concat(levels: list[torch.Tensor]) -> torch.Tensor:
        g = (args.grid, args.grid)
        return torch.cat([F.interpolate(f, size=g, mode="nearest") for f in levels], 1).flatten(2)

    train, test = pyramid(args.n_train, 1.0), pyramid(args.n_test, 1.5)
    t0 = time.perf_counter()
    acc = GaussianAccumulator()
    for i in range(0, args.n_train, args.batch):
        acc.update(concat([f[i : i + args.batch] for f in train]))
    mean, inv_cov = acc.finalize(0.01)
    full_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    d_full = mahalanobis(concat(test), mean, inv_cov)
    full_test = (time.perf_counter() - t0) / args.n_test
    del inv_cov

    t0 = time.perf_counter()
    model = lowrank_fit(train, (args.grid, args.grid), 0.01)
    low_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    d_low = lowrank_mahalanobis(test, model)
    low_test = (time.perf_counter() - t0) / args.n_test

    diff = (d_full - d_low).abs().max().item() / d_full.abs().max().item()
    print(f"N={args.n_train} C={sum(args.dims)} ({'+'.join(map(str, args.dims))}) on grids "
          f"{', '.join(f'{s}x{s}' for s in sizes)} device={dev} threads={torch.get_num_threads()}")
    print(f"{'solver':<10}{'fit s':>10}{'test ms/img':>14}")
    print(f"{'full':<10}{full_fit:>10.2f}{1000 * full_test:>14.1f}")
    print(f"{'lowrank':<10}{low_fit:>10.2f}{1000 * low_test:>14.1f}")
    print(f"fit speed-up {full_fit / low_fit:.1f}x; max relative difference of the maps {diff:.2e}")


if __name__ == "__main__":
    main()
