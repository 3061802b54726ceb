"""Cost of the PaDiM layer sweeps against one single run, measured side by side.

For each preset, ``padim_screw_layers`` (plain) and ``padim_screw_layers_orb90`` (ORB
alignment first), runs as a user would (1) one ``anomaly-bench`` run of PaDiM on one
synthetic category without the feature cache (with the preset's alignment) and (2)
``anomaly-bench -m experiment=<preset>`` on the same category with an empty feature
cache (all 72 jobs, or with ``--jobs 4`` the 4 jobs of layer3 = 2..5 at the default
layer1 and layer2), and prints both wall times, their ratio, the median job (fit + test
seconds from each job's row), the first job's time and the median time from one job's
start to the next's (from the time stamps of the job logs: on a machine with slow spells
these move least), how many jobs ran the backbone (each job logs where its
block outputs came from: memory, disk or the backbone) and the cache folder's size at the
end. Job 0 of a sweep runs the backbone once per image and stores every block of
layer1-3; the other jobs should read them from the in-process memo or from the files.

``--code DIR [DIR ...]`` measures other checkouts of the project (e.g. ``git archive`` of
an earlier commit, with ``anomaly_bench/conf`` linked to its ``conf``) in the same run,
each round running every variant's single run and sweep one after the other, so that
the machine's load falls on all of them alike; ``--rounds N`` repeats that and reports
the median. The variant ``.`` is the installed project.

``--memory-cache-gb 0.5`` runs the sweeps with a small in-process memo, as on a machine
short of memory: jobs then read block outputs from disk, and none but job 0 should run
the backbone.

Each command's minor page faults are counted too: every one is a page of memory the
process touched for the first time. They are what a sweep pays for beyond its computing
when fresh memory is slow to get, as on a virtual machine whose host hands back the
guest's free memory and backs it again page by page on first touch (tens of microseconds
a page). ``--hold-gb N`` keeps N GiB of memory touched in a side process during the
measurement, as another job on the node would, which leaves less free memory at hand.

    python benchmarks/bench_sweep.py [--category rotated_part] [--data-root data]
        [--presets padim_screw_layers padim_screw_layers_orb90] [--jobs 72|4]
        [--code . /tmp/base] [--rounds 1] [--memory-cache-gb auto] [--hold-gb 0]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from itertools import pairwise
from pathlib import Path

from anomaly_bench.report.results import read_rows

PRESETS = {"padim_screw_layers": "none", "padim_screw_layers_orb90": "orb90"}
#: the 4-job sweep: layer3 = 2..5 at the default layer1 and layer2
FOUR_JOBS = ["layers.layer1=2", "layers.layer2=3", "layers.layer3=2,3,4,5"]
#: the per-job line report/callbacks.py logs
#: the time stamp that starts each line of a job log
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", re.M)
SOURCES = re.compile(r"feature cache: (\d+) images from memory, (\d+) from disk, "
                     r"(\d+) through the backbone")


#: a side process holding touched memory until it is stopped (``--hold-gb``)
HOLD = """import mmap, sys, time
m = mmap.mmap(-1, int(float(sys.argv[1]) * 2**30))
for i in range(0, len(m), 4096):
    m[i] = 1
print(flush=True)
time.sleep(1e9)
"""


def run(args: list[str], cwd: Path, code: str) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of the process: user + system, its minor page faults)
    of one command."""
    env = dict(os.environ)
    if code != ".":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(code).resolve()),
                                                        env.get("PYTHONPATH")) if p)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "anomaly_bench.cli", *args], cwd=cwd,
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"failed ({code}): {' '.join(args)}\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            after.ru_minflt - before.ru_minflt)


def cache_size(root: Path) -> float:
    """GiB of the entries under a cache folder."""
    return sum(p.stat().st_size for p in root.rglob("*.safetensors")) / 2**30


def sweep_jobs(sweep: Path) -> tuple[int, list[str], list[float], float, float]:
    """(number of jobs, the jobs that ran the backbone, fit + test s per job, the first
    job's s and the median s from one job's start to the next's after it, both from the
    time stamps of the job logs)."""
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "results.csv").is_file())
    backbone, seconds, spans = [], [], []
    for job in jobs:
        for log in job.glob("*.log"):
            text = log.read_text()
            if any(int(m.group(3)) for m in SOURCES.finditer(text)):
                backbone.append(job.name)
            stamps = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
                      for m in STAMP.finditer(text)]
            if stamps:
                num = json.loads((job / "job.json").read_text())["num"]
                spans.append((num, stamps[0], stamps[-1]))
        for row in read_rows(job / "results.csv"):
            seconds.append(float(row["train_s"]) + float(row["test_s"]))
    spans.sort()
    first = (spans[0][2] - spans[0][1]).total_seconds() if spans else float("nan")
    steps = [(b[1] - a[1]).total_seconds() for a, b in pairwise(spans[1:])]
    step = statistics.median(steps) if steps else float("nan")
    return len(jobs), backbone, seconds, first, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--category", default="rotated_part")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--jobs", type=int, default=72, choices=[72, 4])
    ap.add_argument("--code", nargs="+", default=["."],
                    help="checkouts to measure side by side ('.' = the installed project)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--memory-cache-gb", default="auto",
                    help="memory_cache_gb of the sweeps (auto: sized per job)")
    ap.add_argument("--extra", nargs="*", default=["backbone.pretrained=false"],
                    help="overrides for every run (default: random weights, offline)")
    ap.add_argument("--hold-gb", type=float, default=0.0,
                    help="GiB of memory a side process keeps touched meanwhile")
    args = ap.parse_args()
    holder = None
    if args.hold_gb > 0:
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(args.hold_gb)],
                                  stdout=subprocess.PIPE, text=True)
        holder.stdout.readline()  # every page touched
    try:
        measure(args)
    finally:
        if holder is not None:
            holder.kill()


def measure(args: argparse.Namespace) -> None:
    data_root = Path(args.data_root).resolve()
    #: (wall s, CPU s, page faults) of the single run and of the sweep, per round
    times: dict[tuple[str, str], list[tuple[tuple[float, float, int], ...]]] = {}
    info: dict[tuple[str, str], tuple[int, list[str], float, float]] = {}
    steps: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        common = ["dataset=synthetic", f"dataset.category={args.category}",
                  f"data_root={data_root}", "plots.enabled=false", *args.extra]
        run([*common, "hydra.run.dir=warmup"], work, ".")  # generate the data, warm the disk
        for r in range(args.rounds):
            for preset in args.presets:
                for v, code in enumerate(args.code):
                    tag = f"{preset}_{v}_{r}"
                    single = run([*common, f"alignment={PRESETS[preset]}",
                                  f"hydra.run.dir=single_{tag}"], work, code)
                    cache = work / f"cache_{tag}"
                    sweep = run(["-m", f"experiment={preset}", *common,
                                 *(FOUR_JOBS if args.jobs == 4 else []),
                                 f"memory_cache_gb={args.memory_cache_gb}",
                                 f"backbone.cache.dir={cache}", f"hydra.sweep.dir=sweep_{tag}"],
                                work, code)
                    times.setdefault((preset, code), []).append((single, sweep))
                    n_jobs, backbone, seconds, first, step = sweep_jobs(work / f"sweep_{tag}")
                    steps.setdefault((preset, code), []).append((first, step))
                    info[(preset, code)] = (n_jobs, backbone, statistics.median(seconds),
                                            cache_size(cache))
    print(f"category {args.category}, memory_cache_gb={args.memory_cache_gb}, "
          f"{args.rounds} round(s), medians"
          + (f", {args.hold_gb:g} GiB held by a side process" if args.hold_gb else "") + "\n")
    print("wall: elapsed seconds; CPU: user + system seconds of the command's processes "
          "(what load from other processes on the machine disturbs least)\n")
    print("job 0 s and job to job s: from the job logs' time stamps, the first job's time "
          "and the median time from one job's start to the next's after it (a machine's slow "
          "spells move them least)\n")
    print("page faults: minor page faults of the single run and of the sweep, in thousands "
          "(each a page touched for the first time)\n")
    print("| preset | code | single run s (wall / CPU) | sweep s (wall / CPU) | jobs | "
          "sweep / single (wall / CPU) | page faults k (single / sweep) | job 0 s | "
          "job to job s | median job s (fit+test) | jobs that ran the backbone | cache GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for (preset, code), pairs in times.items():
        cells = []
        for i in (0, 1):  # wall, CPU
            single = statistics.median(p[0][i] for p in pairs)
            sweep = statistics.median(p[1][i] for p in pairs)
            ratio = statistics.median(p[1][i] / p[0][i] for p in pairs)
            cells.append((single, sweep, ratio))
        n_jobs, backbone, median, size = info[(preset, code)]
        first = statistics.median(f for f, _ in steps[(preset, code)])
        step = statistics.median(t for _, t in steps[(preset, code)])
        (sw, sc), (ww, wc), (rw, rc) = zip(*cells, strict=True)
        faults = [statistics.median(p[i][2] for p in pairs) / 1e3 for i in (0, 1)]
        print(f"| {preset} | {code} | {sw:.1f} / {sc:.1f} | {ww:.1f} / {wc:.1f} | {n_jobs} | "
              f"{rw:.2f} / {rc:.2f} | {faults[0]:.0f} / {faults[1]:.0f} | {first:.2f} | "
              f"{step:.3f} | {median:.2f} | "
              f"{len(backbone)} | {size:.2f} |")


if __name__ == "__main__":
    main()
