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
# for seeded random networks, not comparable to the source's numbers).
set -euo pipefail
DATA_ROOT="${1:-${ANOMALY_BENCH_DATA:-data}}"
shift || true
OUT="outputs/multirun/$(date +%Y-%m-%d/%H-%M-%S)"
# Where the jobs run. Plain local multirun for now; the cluster launcher presets go here
# (e.g. LAUNCHER=(hydra/launcher=<preset>)) once they exist.
LAUNCHER=()
for ds in aebad_s aebad_v; do
  anomaly-bench -m "experiment=mmr_${ds}" "method.masking=random,saliency" \
    "data_root=${DATA_ROOT}" "hydra.sweep.dir=${OUT}/${ds}" ${LAUNCHER[@]+"${LAUNCHER[@]}"} "$@"
  echo "== ${ds}: ${OUT}/${ds}/summary.md"
done
