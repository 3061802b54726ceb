#!/usr/bin/env bash
# Reproduce both PaDiM layer-selection tables of the screw study (seeds/002):
# 72 block combinations of WideResNet50-2 layer1-3, without and with ORB 90-degree
# alignment, then the two side by side. Each sweep leaves summary.csv, summary.md and
# figures/ (training images, best and default settings) at its sweep root; comparison.md
# beside the two sweep roots shows their top settings and every setting in both.
#
#   scripts/padim_screw_tables.sh [DATA_ROOT] [extra Hydra overrides...]
#
# DATA_ROOT holds mvtec/screw (default: $ANOMALY_BENCH_DATA or ./data). Offline, add
# backbone.pretrained=false (random weights) or backbone.weights=/path/to/wrn50.pth.
# Add hydra/launcher=submitit_slurm (pip install ".[cluster]") to run on a cluster.
set -euo pipefail
DATA_ROOT="${1:-${ANOMALY_BENCH_DATA:-data}}"
shift || true
OUT="outputs/multirun/$(date +%Y-%m-%d/%H-%M-%S)"
for exp in padim_screw_layers padim_screw_layers_orb90; do
  anomaly-bench -m "experiment=${exp}" "data_root=${DATA_ROOT}" \
    "hydra.sweep.dir=${OUT}/${exp}" "$@"
  echo "== ${exp}: ${OUT}/${exp}/summary.md"
done
anomaly-bench-report "${OUT}/padim_screw_layers" \
  --compare "${OUT}/padim_screw_layers_orb90" --out "${OUT}/comparison.md" >/dev/null
echo "== plain and ORB-aligned side by side: ${OUT}/comparison.md"
cat "${OUT}/comparison.md"
