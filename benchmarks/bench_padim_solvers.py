"""PaDiM fit and scoring: the low-rank (Woodbury) solver against the full covariance solver.

Both are exact; this prints their fit and per-image scoring times and the largest
difference between their distance maps on the same embeddings (WRN50 layer1-3 sizes:
d=550 channels on a 56x56 grid by default).

    python benchmarks/bench_padim_solvers.py --n-train 64 --dim 550 --grid 56
"""

from __future__ import annotations

import argparse
import time

import torch

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
    ap.add_argument("--dim", type=int, default=550)
    ap.add_argument("--grid", type=int, default=56)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    p = args.grid * args.grid
    train = torch.randn(args.n_train, args.dim, p, generator=gen).to(dev)
    test = torch.randn(args.n_test, args.dim, p, generator=gen).to(dev) * 1.5

    t0 = time.perf_counter()
    acc = GaussianAccumulator()
    for i in range(0, args.n_train, args.batch):
        acc.update(train[i : i + args.batch])
    mean, inv_cov = acc.finalize(0.01)
    full_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    d_full = mahalanobis(test, mean, inv_cov)
    full_test = (time.perf_counter() - t0) / args.n_test
    del inv_cov

    t0 = time.perf_counter()
    mean2, centred, chol = lowrank_fit(train, 0.01)
    low_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    d_low = lowrank_mahalanobis(test, mean2, centred, chol, 0.01)
    low_test = (time.perf_counter() - t0) / args.n_test

    diff = (d_full - d_low).abs().max().item() / d_full.abs().max().item()
    print(f"N={args.n_train} C={args.dim} P={p} device={dev} threads={torch.get_num_threads()}")
    print(f"{'solver':<10}{'fit s':>10}{'test ms/img':>14}")
    print(f"{'full':<10}{full_fit:>10.2f}{1000 * full_test:>14.1f}")
    print(f"{'lowrank':<10}{low_fit:>10.2f}{1000 * low_test:>14.1f}")
    print(f"fit speed-up {full_fit / low_fit:.1f}x; max relative difference of the maps {diff:.2e}")


if __name__ == "__main__":
    main()
