#!/usr/bin/env bash
# Reproduce the zero-shot and few-shot tables of the CLIP methods (seeds/004) in one go:
# WinCLIP (zero-shot, and WinCLIP+ with k = 1, 2, 4 reference images) and APRIL-GAN, on
# MVTec AD and VisA.
#
#   scripts/clip_tables.sh [DATA_ROOT] [extra Hydra overrides...]
#
# DATA_ROOT holds mvtec/ and visa/ (default: $ANOMALY_BENCH_DATA or ./data). The published
# figures need the published weights: ViT-B-16-plus-240 laion400m_e31 (WinCLIP) and
# ViT-L-14-336 openai (APRIL-GAN), from the hub or, offline, as local files
# (backbone.weights=PATH); backbone.pretrained=false (random weights) is a dry run, not the
# table. Each run or sweep leaves results.csv (sweeps also summary.md and summary.csv)
# under outputs/clip_tables/<date>/<time>; the script prints where.
# Add hydra/launcher=submitit_slurm (pip install ".[cluster]") to run on a cluster.
#
# APRIL-GAN: its adapters learn from one dataset's annotated test images and are tested on
# the other (VisA -> MVTec AD, MVTec AD -> VisA), zero-shot and with k = 1, 2, 4 reference
# images. APRILGAN_ADAPTERS=DIR uses the published adapters (DIR = exps/pretrained of the
# official repository: mvtec_pretrained.pth, visa_pretrained.pth) instead of training them.
set -euo pipefail
DATA_ROOT="${1:-${ANOMALY_BENCH_DATA:-data}}"
shift || true
OUT="outputs/clip_tables/$(date +%Y-%m-%d/%H-%M-%S)"

# ------------------------------------------------------------------------ WinCLIP
WC="${OUT}/winclip"
for dataset in mvtec visa; do
  anomaly-bench experiment=winclip_zero_shot "dataset=${dataset}" "data_root=${DATA_ROOT}" \
    "hydra.run.dir=${WC}/zero_shot_${dataset}" "$@"
  anomaly-bench -m experiment=winclip_few_shot "dataset=${dataset}" "data_root=${DATA_ROOT}" \
    "hydra.sweep.dir=${WC}/few_shot_${dataset}" "$@"
done

# ------------------------------------------------------------------------ APRIL-GAN
AG="${OUT}/aprilgan"
if [[ -n "${APRILGAN_ADAPTERS:-}" ]]; then
  for src in visa mvtec; do
    anomaly-bench-import-aprilgan "${APRILGAN_ADAPTERS}/${src}_pretrained.pth" \
      "${AG}/trained_on_${src}/model.pt" --trained-on "${src}" "$@"
  done
else
  anomaly-bench experiment=aprilgan_zero_shot_mvtec stage=train dataset=visa \
    "data_root=${DATA_ROOT}" "hydra.run.dir=${AG}/trained_on_visa" "$@"
  anomaly-bench experiment=aprilgan_zero_shot_visa stage=train dataset=mvtec \
    "data_root=${DATA_ROOT}" "hydra.run.dir=${AG}/trained_on_mvtec" "$@"
fi
anomaly-bench -m experiment=aprilgan_zero_shot_mvtec "checkpoint=${AG}/trained_on_visa/model.pt" \
  "data_root=${DATA_ROOT}" "hydra.sweep.dir=${AG}/zero_shot_mvtec" "$@"
anomaly-bench -m experiment=aprilgan_zero_shot_visa "checkpoint=${AG}/trained_on_mvtec/model.pt" \
  "data_root=${DATA_ROOT}" "hydra.sweep.dir=${AG}/zero_shot_visa" "$@"
anomaly-bench -m experiment=aprilgan_few_shot "checkpoint=${AG}/trained_on_visa/model.pt" \
  "data_root=${DATA_ROOT}" "hydra.sweep.dir=${AG}/few_shot_mvtec" "$@"
anomaly-bench -m experiment=aprilgan_zero_shot_visa method.k_shot=1,2,4 \
  "checkpoint=${AG}/trained_on_mvtec/model.pt" "data_root=${DATA_ROOT}" \
  "hydra.sweep.dir=${AG}/few_shot_visa" "$@"

# ------------------------------------------------------------------------ where
for dataset in mvtec visa; do
  echo "== WinCLIP zero-shot, ${dataset}: ${WC}/zero_shot_${dataset}/results.csv"
  echo "== WinCLIP+ k = 1, 2, 4, ${dataset}: ${WC}/few_shot_${dataset}/summary.md"
  cat "${WC}/few_shot_${dataset}/summary.md"
done
for table in zero_shot_mvtec zero_shot_visa few_shot_mvtec few_shot_visa; do
  echo "== APRIL-GAN ${table}: ${AG}/${table}/summary.md"
  cat "${AG}/${table}/summary.md"
done
