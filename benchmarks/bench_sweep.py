"""Cost of the 72-job PaDiM layer sweep against one single run, measured side by side.

Runs, as a user would, (1) one ``anomaly-bench`` run of PaDiM on one synthetic category
without the feature cache and (2) ``anomaly-bench -m experiment=padim_screw_layers`` on
the same category with an empty feature cache, and prints both wall times and their
ratio. The sweep runs the backbone once per image (job 0 fills the cache with every block
of layer1-3); the other 71 jobs read block outputs from the cache.

    python benchmarks/bench_sweep.py [--category rotated_part] [--data-root data]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(args: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "anomaly_bench.cli", *args], cwd=cwd,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--category", default="rotated_part")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--extra", nargs="*", default=["backbone.pretrained=false"],
                    help="overrides for both runs (default: random weights, offline)")
    args = ap.parse_args()
    data_root = Path(args.data_root).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        common = ["dataset=synthetic", f"dataset.category={args.category}",
                  f"data_root={data_root}", *args.extra]
        run([*common, "hydra.run.dir=warmup"], work)  # generate the dataset, warm the disk
        single = run([*common, "hydra.run.dir=single"], work)
        sweep = run(["-m", "experiment=padim_screw_layers", *common,
                     f"backbone.cache.dir={work / 'cache'}", "hydra.sweep.dir=sweep"], work)
        n_jobs = sum(1 for p in (work / "sweep").iterdir() if p.name.isdigit())
        summary = (work / "sweep" / "summary.md").read_text()
    print(summary)
    print("| run | wall s | ratio to single |\n|---|---:|---:|")
    print(f"| single run (no cache) | {single:.1f} | 1.00 |")
    print(f"| {n_jobs}-job sweep (feature cache) | {sweep:.1f} | {sweep / single:.2f} |")
    print(f"per sweep job: {sweep / n_jobs:.2f} s")


if __name__ == "__main__":
    main()
