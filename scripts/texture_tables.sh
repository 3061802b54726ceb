#!/usr/bin/env bash
# Reproduce the version table of the zero-shot texture kNN document (seeds/000): the six
# versions (#01 original code ... #06) on MVTec AD's five textures, one job per version,
# summary.md listing them in the source's order with seconds per image, image and pixel
# AUROC.
#
#   scripts/texture_tables.sh [DATA_ROOT] [extra Hydra overrides...]
#
# DATA_ROOT holds mvtec/ (default: $ANOMALY_BENCH_DATA or ./data). Runtimes compare only
# within one machine: on SLURM every version runs on its own node of the same partition
# (set hydra.launcher.constraint=... to pin one GPU model). LAUNCHER, OUT: scripts/lib/launch.sh.
set -euo pipefail
source "$(dirname "$0")/lib/launch.sh"
ab_init texture "$@"
ab_sweep texture_versions \
  experiment=texture_v01,texture_v02,texture_v03,texture_v04,texture_v05,texture_v06 || true
ab_done
