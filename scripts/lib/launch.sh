# shellcheck shell=bash
# Shared by the scripts that reproduce the source tables: where the jobs run, where the
# sweeps go, and one line per table at the end. Source it from a script in scripts/:
#
#   source "$(dirname "$0")/lib/launch.sh"
#   ab_init "padim" "$@"                 # DATA_ROOT from $1 (else $ANOMALY_BENCH_DATA, ./data)
#   ab_sweep plain experiment=padim_screw_layers   # a Hydra multirun into $OUT/plain
#   ab_bg aligned experiment=padim_screw_layers_orb90   # in the background, side by side
#   ab_wait                              # waits for the background sweeps
#   ab_job_dir "$OUT/plain"              # the job directory of a one-job sweep
#   ab_done                              # the list of tables, exit non-zero after failures
#
# Environment:
#   LAUNCHER  slurm (default: the whole sweep as one SLURM array through the submitit
#             preset, conf/hydra/launcher/slurm.yaml), parallel (local processes, joblib),
#             submitit_local, or basic (one job after another in this process).
#   OUT       the folder the sweeps go to (default outputs/<name>/<date>/<time>); give an
#             existing one to resume: finished jobs are reused, failed ones run again.
#   ANOMALY_BENCH_SLURM_PARTITION / ANOMALY_BENCH_SLURM_ACCOUNT, or conf/local/default.yaml:
#             the site's SLURM settings. Extra arguments of the script (after DATA_ROOT) go
#             to every command: Hydra overrides such as hydra.launcher.timeout_min=600 or
#             backbone.weights=/path/to/weights.pth.
# A single configuration runs as a one-job sweep, so it goes through the launcher too.
# Every sweep is submitted from this shell and waited for: on a login node run the script
# under tmux or nohup; a SLURM job that times out or is preempted is requeued and resumes.

AB_TABLES=()
AB_FAILED=()
AB_PIDS=()
AB_NAMES=()

# ab_init NAME [DATA_ROOT] [overrides...]: set DATA_ROOT, OUT, LAUNCHER and AB_EXTRA.
ab_init() {
  local name="$1"
  shift
  DATA_ROOT="${1:-${ANOMALY_BENCH_DATA:-data}}"
  shift || true
  AB_EXTRA=("$@")
  LAUNCHER="${LAUNCHER:-slurm}"
  OUT="${OUT:-outputs/${name}/$(date +%Y-%m-%d/%H-%M-%S)}"
  AB_LAUNCH=()
  if [[ "${LAUNCHER}" != "basic" ]]; then
    AB_LAUNCH=("hydra/launcher=${LAUNCHER}")
  fi
  echo "== ${name}: sweeps under ${OUT} (launcher: ${LAUNCHER}, data: ${DATA_ROOT})"
}

# ab_sweep NAME [overrides...]: one multirun into $OUT/NAME through the launcher, in the
# foreground; its exit code is returned (a script with `set -e` stops there, which is what
# a later step that needs its results wants) and a failure is remembered for ab_done.
ab_sweep() {
  AB_TABLES+=("${OUT}/$1/summary.md")
  _ab_multirun "$@" || {
    local code=$?
    AB_FAILED+=("$1")
    return "${code}"
  }
}

_ab_multirun() {
  local name="$1"
  shift
  local dir="${OUT}/${name}" code=0
  anomaly-bench -m "$@" "data_root=${DATA_ROOT}" "hydra.sweep.dir=${dir}" \
    ${AB_LAUNCH[@]+"${AB_LAUNCH[@]}"} ${AB_EXTRA[@]+"${AB_EXTRA[@]}"} || code=$?
  if ((code)); then
    echo "== ${name}: FAILED (exit ${code}); its finished jobs are in ${dir}" >&2
  else
    echo "== ${name}: ${dir}/summary.md"
  fi
  return "${code}"
}

# ab_bg NAME [overrides...]: a sweep in the background, beside the others (on SLURM each
# is one array job waiting in the queue); ab_wait collects them.
ab_bg() {
  _ab_multirun "$@" &
  AB_PIDS+=("$!")
  AB_NAMES+=("$1")
  AB_TABLES+=("${OUT}/$1/summary.md")
}

# ab_wait: wait for the background sweeps; remember the failed ones.
ab_wait() {
  local i
  for i in "${!AB_PIDS[@]}"; do
    if ! wait "${AB_PIDS[$i]}"; then
      AB_FAILED+=("${AB_NAMES[$i]}")
    fi
  done
  AB_PIDS=()
  AB_NAMES=()
}

# ab_job_dir SWEEP_DIR: the directory of the only finished job of a one-job sweep.
ab_job_dir() {
  local dir
  dir=$(grep -l -E '"status": "(finished|reused)"' "$1"/job-*/job.json 2>/dev/null | head -n 1)
  if [[ -z "${dir}" ]]; then
    echo "no finished job in $1" >&2
    return 1
  fi
  dirname "${dir}"
}

# ab_done: list the tables; exit non-zero when a sweep failed.
ab_done() {
  local table
  for table in "${AB_TABLES[@]}"; do
    [[ -f "${table}" ]] && echo "   ${table}"
  done
  if ((${#AB_FAILED[@]})); then
    echo "== failed: ${AB_FAILED[*]} (run again with OUT=${OUT} to resume)" >&2
    exit 1
  fi
}
