"""Metric change of the backbone's mixed-precision switch, measured side by side.

Runs each method twice on the same data, with ``backbone.precision=fp32`` and with the
reduced precision (``bf16`` by default: on a machine without CUDA this is CPU bfloat16
autocast, which is what can be measured there; ``fp16`` needs CUDA), and prints per
method and category the image AUROC, pixel AUROC and AUPRO of both runs, their largest
absolute difference, and both runs' test time per image. Offline the backbone has seeded
random weights (``backbone.pretrained=false``): the differences then show how much the
switch moves the numbers of the same network, not published figures.

    python benchmarks/bench_precision.py [--methods padim patchcore spade texture_knn]
        [--precision bf16] [--device auto] [--data-root data] [--extra ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from anomaly_bench.report.results import read_rows

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def run(args: list[str], run_dir: Path) -> list[dict[str, str]]:
    proc = subprocess.run([sys.executable, "-m", "anomaly_bench.cli", *args,
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{proc.stderr[-3000:]}")
    return read_rows(run_dir / "results.csv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["padim", "patchcore", "spade",
                                                     "texture_knn"])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--extra", nargs="*", default=["backbone.pretrained=false"])
    args = ap.parse_args()
    common = ["dataset=synthetic", "dataset.category=all", f"device={args.device}",
              f"data_root={Path(args.data_root).resolve()}", "plots.enabled=false",
              *args.extra]
    lines, worst = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            rows = {p: run([f"method={method}", *common, f"backbone.precision={p}"],
                           Path(tmp) / f"{method}_{p}")
                    for p in ("fp32", args.precision)}
            for a, b in zip(rows["fp32"], rows[args.precision], strict=True):
                diffs = [abs(float(a[m]) - float(b[m])) for m in METRICS if a[m] and b[m]]
                worst = max(worst, *diffs) if diffs else worst
                lines.append(
                    f"| {method} | {a['category']} | "
                    + " | ".join(f"{a[m] and float(a[m]):.4f} / {b[m] and float(b[m]):.4f}"
                                 for m in METRICS)
                    + f" | {max(diffs) if diffs else 0:.1e} | {float(a['ms_per_image']):.0f} / "
                    f"{float(b['ms_per_image']):.0f} | {b['device']} |")
    print(f"fp32 / {args.precision} (backbone autocast), {' '.join(args.extra)}\n")
    print("| method | category | image AUROC | pixel AUROC | AUPRO | max abs diff | "
          "ms/img | device |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    print("\n".join(lines))
    print(f"\nlargest metric change: {worst:.1e}")


if __name__ == "__main__":
    main()
