#!/usr/bin/env bash
# Reproduce the zero-shot and few-shot tables of the CLIP methods (seeds/004) in one go:
# WinCLIP (zero-shot, and WinCLIP+ with k = 1, 2, 4 reference images) and APRIL-GAN, on
# MVTec AD and VisA.
#
#   scripts/clip_tables.sh [DATA_ROOT] [extra Hydra overrides...]
#
# DATA_ROOT holds mvtec/ and visa/ (default: $ANOMALY_BENCH_DATA or ./data). The published
# figures need the published weights: ViT-B-16-plus-240 laion400m_e31 (WinCLIP) and
# ViT-L-14-336 openai (APRIL-GAN), from the hub (anomaly-bench-prefetch on a login node) or
# as local files (backbone.weights=PATH); backbone.pretrained=false (random weights) is a
# dry run, not the table. LAUNCHER, OUT: scripts/lib/launch.sh (SLURM by default).
#
# APRIL-GAN: its adapters learn from one dataset's annotated test images and are tested on
# the other (VisA -> MVTec AD, MVTec AD -> VisA), zero-shot and with k = 1, 2, 4 reference
# images. APRILGAN_ADAPTERS=DIR uses the published adapters (DIR = exps/pretrained of the
# official repository: mvtec_pretrained.pth, visa_pretrained.pth) instead of training them.
set -euo pipefail
source "$(dirname "$0")/lib/launch.sh"
ab_init clip "$@"

# WinCLIP: no training; the four sweeps queue side by side
for dataset in mvtec visa; do
  ab_bg "winclip_zero_shot_${dataset}" experiment=winclip_zero_shot "dataset=${dataset}"
  ab_bg "winclip_few_shot_${dataset}" experiment=winclip_few_shot "dataset=${dataset}"
done

# APRIL-GAN adapters: trained on one dataset (a one-job sweep each), or imported
if [[ -n "${APRILGAN_ADAPTERS:-}" ]]; then
  model_overrides=()  # the run's overrides that describe the model (not Hydra's own)
  for arg in ${AB_EXTRA[@]+"${AB_EXTRA[@]}"}; do
    [[ "${arg}" == hydra* ]] || model_overrides+=("${arg}")
  done
  for src in visa mvtec; do
    anomaly-bench-import-aprilgan "${APRILGAN_ADAPTERS}/${src}_pretrained.pth" \
      "${OUT}/aprilgan_trained_on_${src}/model.pt" --trained-on "${src}" \
      ${model_overrides[@]+"${model_overrides[@]}"}
  done
  on_visa="${OUT}/aprilgan_trained_on_visa/model.pt"
  on_mvtec="${OUT}/aprilgan_trained_on_mvtec/model.pt"
else
  ab_bg aprilgan_trained_on_visa experiment=aprilgan_zero_shot_mvtec stage=train dataset=visa
  ab_bg aprilgan_trained_on_mvtec experiment=aprilgan_zero_shot_visa stage=train dataset=mvtec
  ab_wait
  on_visa="$(ab_job_dir "${OUT}/aprilgan_trained_on_visa")/model.pt"
  on_mvtec="$(ab_job_dir "${OUT}/aprilgan_trained_on_mvtec")/model.pt"
fi

# APRIL-GAN tested on the other dataset, zero-shot and k = 1, 2, 4
ab_bg aprilgan_zero_shot_mvtec experiment=aprilgan_zero_shot_mvtec "checkpoint=${on_visa}"
ab_bg aprilgan_zero_shot_visa experiment=aprilgan_zero_shot_visa "checkpoint=${on_mvtec}"
ab_bg aprilgan_few_shot_mvtec experiment=aprilgan_few_shot "checkpoint=${on_visa}"
ab_bg aprilgan_few_shot_visa experiment=aprilgan_zero_shot_visa method.k_shot=1,2,4 \
  "checkpoint=${on_mvtec}"
ab_wait
ab_done
