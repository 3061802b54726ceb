"""Greedy coreset selection: ours against the straightforward per-step loop, side by side.

Selects ``ratio`` of N clustered random features of width D (projection to 128 included)
and times the straightforward greedy loop (one pass over all N points per selection) for
``--reference-steps`` steps, extrapolated to the full selection. Also checks that the
first steps choose the same points (float32, the default precision).

    python benchmarks/bench_coreset.py [--n 200000 --dim 1536 --ratio 0.1]
"""

from __future__ import annotations

import argparse
import time

import torch

from anomaly_bench.ops.coreset import (
    coreset_size,
    greedy_coreset,
    random_projection,
    reference_greedy_coreset,
)
from anomaly_bench.runtime import resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--reference-steps", type=int, default=400)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(64, args.dim, generator=gen)
    x = centres[torch.randint(0, 64, (args.n,), generator=gen)]
    x += 0.7 * torch.randn(args.n, args.dim, generator=gen)
    x = x.to(device)
    k = coreset_size(args.n, args.ratio)

    t0 = time.perf_counter()
    ours = greedy_coreset(x, k, seed=0, progress=True)
    ours_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    proj = random_projection(x, 128, seed=0)
    proj_s = time.perf_counter() - t0
    steps = min(args.reference_steps, k)
    t0 = time.perf_counter()
    ref = reference_greedy_coreset(proj, steps, seed=0)
    ref_step_s = (time.perf_counter() - t0) / steps
    ref_s = proj_s + ref_step_s * k
    agree = int((ours[:steps] == ref).cumprod(0).sum())

    print(f"device {device}; torch {torch.__version__}; {torch.get_num_threads()} threads")
    print("| N | D | selected | ours s | straightforward s (extrapolated) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.n} | {args.dim} | {k} | {ours_s:.1f} | {ref_s:.1f} "
          f"({1000 * ref_step_s:.2f} ms/step x {k}) | {ref_s / ours_s:.1f}x |")
    print(f"first {steps} selections identical to the straightforward loop: {agree}/{steps}")


if __name__ == "__main__":
    main()
