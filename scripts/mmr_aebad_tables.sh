#!/usr/bin/env bash
# Reproduce the source's two MMR comparison tables (seeds/001): MMR with random masking
# and with saliency-guided random masking, on AeBAD-S (image AUROC and PRO per domain
# shift, their mean) and AeBAD-V (image AUROC per video). One multirun per dataset over
# method.masking=random,saliency; each sweep root gets summary.md with the per-subset
# tables (summary.subset_tables of the presets) and summary.csv.
#
#   scripts/mmr_aebad_tables.sh [DATA_ROOT] [extra Hydra overrides...]
#
# DATA_ROOT holds AeBAD/AeBAD_S and AeBAD/AeBAD_V (default: $ANOMALY_BENCH_DATA or ./data).
# Weights: backbone.weights=/path/to/mae_visualize_vit_base.pth and
# method.teacher.weights=/path/to/wide_resnet50_2.pth offline (or backbone.pretrained=false
# for seeded random networks, not comparable to the source's numbers). Each job trains for
# 200 epochs: on SLURM give it the time (hydra.launcher.timeout_min=...); a job preempted
# or timed out is requeued and resumes from its training state. LAUNCHER, OUT:
# scripts/lib/launch.sh (SLURM by default).
set -euo pipefail
source "$(dirname "$0")/lib/launch.sh"
ab_init mmr "$@"
ab_bg mmr_aebad_s experiment=mmr_aebad_s method.masking=random,saliency
ab_bg mmr_aebad_v experiment=mmr_aebad_v method.masking=random,saliency
ab_wait
ab_done
