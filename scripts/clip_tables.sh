#!/usr/bin/env bash
# Reproduce the zero-shot and few-shot tables of the APRIL-GAN source (seeds/004) in one
# go: WinCLIP (zero-shot, and WinCLIP+ with k = 1, 2, 4 reference images) and APRIL-GAN,
# on MVTec AD and VisA. Each run or sweep leaves results.csv (and for sweeps summary.csv
# and summary.md) under OUT; the script prints where.
#
#   scripts/clip_tables.sh [DATA_ROOT] [extra Hydra overrides...]
#
# DATA_ROOT holds mvtec/ and visa/ (default: $ANOMALY_BENCH_DATA or ./data). The published
# figures need the published weights: ViT-B-16-plus-240 laion400m_e31 (WinCLIP) and
# ViT-L-14-336 openai (APRIL-GAN), from the hub or as local files
# (backbone.weights=PATH); backbone.pretrained=false runs the pipeline with random weights.
# Add hydra/launcher=submitit_slurm (pip install ".[cluster]") to run on a cluster.
set -euo pipefail
DATA_ROOT="${1:-${ANOMALY_BENCH_DATA:-data}}"
shift || true
OUT="outputs/clip_tables/$(date +%Y-%m-%d/%H-%M-%S)"

# ---- WinCLIP: zero-shot, then few-shot (k = 1, 2, 4), on each dataset
for dataset in mvtec visa; do
  anomaly-bench experiment=winclip_zero_shot "dataset=${dataset}" "data_root=${DATA_ROOT}" \
    "hydra.run.dir=${OUT}/winclip_zero_shot/${dataset}" "$@"
  echo "== WinCLIP zero-shot, ${dataset}: ${OUT}/winclip_zero_shot/${dataset}/results.csv"
  anomaly-bench -m experiment=winclip_few_shot "dataset=${dataset}" "data_root=${DATA_ROOT}" \
    "hydra.sweep.dir=${OUT}/winclip_few_shot/${dataset}" "$@"
  echo "== WinCLIP+ k = 1, 2, 4, ${dataset}: ${OUT}/winclip_few_shot/${dataset}/summary.md"
done

# ---- APRIL-GAN: adapters trained on one dataset, tested zero- and few-shot on the other
# (its presets aprilgan_zero_shot_mvtec, aprilgan_zero_shot_visa, aprilgan_few_shot)
