"""What the source tables' metrics add to a PaDiM run, measured side by side.

``image_ap``, ``pixel_ap``, ``pixel_f1_max``, ``aupro_200`` and ``aupro_200_per_image``
are computed with the official metrics in one pass (:func:`~anomaly_bench.metrics.
pixel_metrics`: the defect-free and the defect pixels each sorted once, the new ones
read off the same counts, the per-image PRO from one bucketize). This benchmark runs
PaDiM (seeded random WRN50, the paper's 256/224 input) through the command on a texture
and an object of the synthetic data, and on maps and masks of the same count and size
(smooth noise with blob defects) times, each the median of ``--repeats`` calls:

* the official metrics alone (pixel AUROC and AUPRO: regions, the sorts, the two areas;
  image AUROC and F1-max), and
* what the new metrics add to them (AP of the image scores, pixel AP and F1-max off the
  counts, ``aupro_200`` off the counts, ``aupro_200_per_image``),

and prints the added seconds as a share of the category's fit + test seconds and of the
run's wall time. Prints figures, no pass/fail.

    python benchmarks/bench_metric_cost.py [--categories stripes rotated_part]
        [--repeats 5] [--data-root DIR]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_aupro import make_data

from anomaly_bench.metrics.pro import aupro_of, counts_of, regions_of
from anomaly_bench.metrics.pro200 import aupro_200_of, per_image_of
from anomaly_bench.metrics.roc import (
    ap_from_counts,
    area_from_counts,
    auroc,
    average_precision,
    f1_from_counts,
    f1_max,
)
from anomaly_bench.report.results import read_rows


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def metric_seconds(n: int, size: int, repeats: int) -> tuple[float, float]:
    """(official metrics, what the new ones add) in seconds on n maps of size x size."""
    maps, masks = make_data(n, size, "cpu")
    scores = maps.flatten(1).amax(1)
    labels = masks.flatten(1).any(1)

    def official() -> None:
        counts = counts_of(regions_of(maps, masks))
        area_from_counts(counts.fp, counts.tp)
        aupro_of(counts, 0.3)
        auroc(scores, labels)
        f1_max(scores, labels)

    counts = counts_of(regions_of(maps, masks))
    regions = regions_of(maps, masks)

    def added() -> None:
        average_precision(scores, labels)
        ap_from_counts(counts.fp, counts.tp)
        f1_from_counts(counts.fp, counts.tp)
        aupro_200_of(counts)
        per_image_of(regions)

    return timed(official, repeats), timed(added, repeats)


def padim_run(category: str, data_root: Path, out: Path) -> tuple[dict[str, str], float]:
    """The row of one PaDiM run on ``category`` and the command's wall seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "anomaly_bench.cli", "method=padim",
                    "dataset=synthetic", f"dataset.category={category}",
                    f"data_root={data_root}", "backbone.pretrained=false",
                    "plots.enabled=false", "device=cpu", f"hydra.run.dir={out}"],
                   check=True, capture_output=True)
    wall = time.perf_counter() - start
    return read_rows(out / "results.csv")[0], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", nargs="+", default=["stripes", "rotated_part"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-root", type=Path, default=None,
                        help="where the synthetic data is (written there when missing)")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print("| category | test images | fit + test s | run wall s | official metrics s | "
          "added s | added / fit+test | added / wall |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root or Path(tmp) / "data"
        for category in args.categories:
            row, wall = padim_run(category, root, Path(tmp) / category)
            n = int(row["n_test"])
            work = float(row["train_s"]) + float(row["test_s"])
            official, added = metric_seconds(n, 224, args.repeats)
            print(f"| {category} | {n} | {work:.2f} | {wall:.2f} | {official:.3f} | "
                  f"{added:.3f} | {100 * added / work:.1f}% | {100 * added / wall:.1f}% |")


if __name__ == "__main__":
    main()
