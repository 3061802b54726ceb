#!/usr/bin/env bash
# Reproduce the SPADE results (seeds/003): MVTec AD with the published settings (all 15
# categories), the feature-pyramid ablation (Table 6: pixel scores from layer1, layer2,
# layer3 or all three), the gallery ablation (Table 7: K nearest or K random training
# images, three seeds), and ShanghaiTech Campus (K = 1).
#
#   scripts/spade_tables.sh [DATA_ROOT] [extra Hydra overrides...]
#
# DATA_ROOT holds mvtec/ and shanghaitech/ (default: $ANOMALY_BENCH_DATA or ./data). On
# SLURM the four sweeps queue at once (one array each); LAUNCHER, OUT: scripts/lib/launch.sh.
set -euo pipefail
source "$(dirname "$0")/lib/launch.sh"
ab_init spade "$@"
ab_bg spade_mvtec method=spade dataset=mvtec dataset.category=all
ab_bg spade_mvtec_layers experiment=spade_mvtec_layers
ab_bg spade_mvtec_gallery experiment=spade_mvtec_gallery seed=0,1,2
ab_bg spade_stc experiment=spade_stc
ab_wait
ab_done
