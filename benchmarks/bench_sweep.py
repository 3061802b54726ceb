"""Cost of the 72-job PaDiM layer sweeps against one single run, measured side by side.

For each preset, ``padim_screw_layers`` (plain) and ``padim_screw_layers_orb90`` (ORB
alignment first), runs as a user would (1) one ``anomaly-bench`` run of PaDiM on one
synthetic category without the feature cache (with the preset's alignment) and (2)
``anomaly-bench -m experiment=<preset>`` on the same category with an empty feature
cache, and prints both wall times, their ratio, the median job (fit + test seconds from
each job's row), how many jobs ran the backbone (each job logs where its block outputs
came from: memory, disk or the backbone) and the cache folder's size at the end. Job 0
of a sweep runs the backbone once per image and stores every block of layer1-3; the
other 71 jobs should read them from the in-process memo or from the files.

``--memory-cache-gb 0.5`` runs the sweeps with a small in-process memo, as on a machine
short of memory: jobs then read block outputs from disk, and none but job 0 should run
the backbone.

    python benchmarks/bench_sweep.py [--category rotated_part] [--data-root data]
        [--presets padim_screw_layers padim_screw_layers_orb90] [--memory-cache-gb auto]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from anomaly_bench.report.results import read_rows

PRESETS = {"padim_screw_layers": "none", "padim_screw_layers_orb90": "orb90"}
#: the per-job line report/callbacks.py logs
SOURCES = re.compile(r"feature cache: (\d+) images from memory, (\d+) from disk, "
                     r"(\d+) through the backbone")


def run(args: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "anomaly_bench.cli", *args], cwd=cwd,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def cache_size(root: Path) -> float:
    """GiB of the entries under a cache folder."""
    return sum(p.stat().st_size for p in root.rglob("*.safetensors")) / 2**30


def sweep_jobs(sweep: Path) -> tuple[int, list[int], list[float]]:
    """(number of jobs, numbers of the jobs that ran the backbone, fit + test s per job)."""
    jobs = sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    backbone, seconds = [], []
    for job in jobs:
        for log in job.glob("*.log"):
            if any(int(m.group(3)) for m in SOURCES.finditer(log.read_text())):
                backbone.append(int(job.name))
        for row in read_rows(job / "results.csv"):
            seconds.append(float(row["train_s"]) + float(row["test_s"]))
    return len(jobs), backbone, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--category", default="rotated_part")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--memory-cache-gb", default="auto",
                    help="memory_cache_gb of the sweeps (auto = 4 GiB in a multirun)")
    ap.add_argument("--extra", nargs="*", default=["backbone.pretrained=false"],
                    help="overrides for every run (default: random weights, offline)")
    args = ap.parse_args()
    data_root = Path(args.data_root).resolve()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        common = ["dataset=synthetic", f"dataset.category={args.category}",
                  f"data_root={data_root}", "plots.enabled=false", *args.extra]
        run([*common, "hydra.run.dir=warmup"], work)  # generate the dataset, warm the disk
        for preset in args.presets:
            single = run([*common, f"alignment={PRESETS[preset]}",
                          f"hydra.run.dir=single_{preset}"], work)
            cache = work / f"cache_{preset}"
            sweep = run(["-m", f"experiment={preset}", *common,
                         f"memory_cache_gb={args.memory_cache_gb}",
                         f"backbone.cache.dir={cache}", f"hydra.sweep.dir=sweep_{preset}"],
                        work)
            n_jobs, backbone, seconds = sweep_jobs(work / f"sweep_{preset}")
            rows.append((preset, single, sweep, n_jobs, backbone, statistics.median(seconds),
                         cache_size(cache)))
    print(f"category {args.category}, memory_cache_gb={args.memory_cache_gb}\n")
    print("| preset | single run s | sweep s | jobs | sweep / single | median job s "
          "(fit+test) | jobs that ran the backbone | cache GiB |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for preset, single, sweep, n_jobs, backbone, median, size in rows:
        ran = f"{len(backbone)} ({', '.join(map(str, backbone[:8]))}" + (
            ", ...)" if len(backbone) > 8 else ")")
        print(f"| {preset} | {single:.1f} | {sweep:.1f} | {n_jobs} | {sweep / single:.2f} | "
              f"{median:.2f} | {ran} | {size:.2f} |")


if __name__ == "__main__":
    main()
