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
# backbone.pretrained=false (random weights) or backbone.weights=/path/to/wrn50.pth, or
# fetch the weights first on a node with network: anomaly-bench-prefetch experiment=...
# Runs on SLURM by default (LAUNCHER=slurm: each sweep one array, both queued at once);
# LAUNCHER=basic runs here, one job after another. OUT=<folder of an earlier run> resumes.
# See scripts/lib/launch.sh.
set -euo pipefail
source "$(dirname "$0")/lib/launch.sh"
ab_init padim_screw "$@"
# the two sweeps share one feature cache: run them one after the other on one machine
# (the second reads the first's block outputs); on SLURM both arrays queue at once
if [[ "${LAUNCHER}" == "slurm" ]]; then
  ab_bg padim_screw_layers experiment=padim_screw_layers
  ab_bg padim_screw_layers_orb90 experiment=padim_screw_layers_orb90
  ab_wait
else
  ab_sweep padim_screw_layers experiment=padim_screw_layers || true
  ab_sweep padim_screw_layers_orb90 experiment=padim_screw_layers_orb90 || true
fi
if anomaly-bench-report "${OUT}/padim_screw_layers" \
    --compare "${OUT}/padim_screw_layers_orb90" --out "${OUT}/comparison.md" >/dev/null; then
  echo "== plain and ORB-aligned side by side: ${OUT}/comparison.md"
  cat "${OUT}/comparison.md"
fi
ab_done
