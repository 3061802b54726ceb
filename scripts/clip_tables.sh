#!/usr/bin/env bash
# Reproduce the zero-shot and few-shot tables of the CLIP methods (seeds/004) in one go.
#
#   scripts/clip_tables.sh [DATA_ROOT] [extra Hydra overrides...]
#
# DATA_ROOT holds mvtec/ and visa/ (default: $ANOMALY_BENCH_DATA or ./data). Offline, pass
# backbone.weights=/path/to/the/weights (the OpenAI ViT-L-14-336 file for APRIL-GAN) or
# backbone.pretrained=false (random weights: a dry run, not the table). Each table is a
# sweep directory with summary.md and summary.csv under outputs/clip_tables/<date>/<time>.
#
# APRIL-GAN: its adapters learn from one dataset's annotated test images and are tested on
# the other (VisA -> MVTec AD, MVTec AD -> VisA), zero-shot and with k = 1, 2, 4 reference
# images. APRILGAN_ADAPTERS=DIR uses the published adapters (DIR = exps/pretrained of the
# official repository: mvtec_pretrained.pth, visa_pretrained.pth) instead of training them.
set -euo pipefail
DATA_ROOT="${1:-${ANOMALY_BENCH_DATA:-data}}"
shift || true
OUT="outputs/clip_tables/$(date +%Y-%m-%d/%H-%M-%S)"

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
for table in zero_shot_mvtec zero_shot_visa few_shot_mvtec few_shot_visa; do
  echo "== APRIL-GAN ${table}: ${AG}/${table}/summary.md"
  cat "${AG}/${table}/summary.md"
done
