#!/usr/bin/env bash
# Run a study's sweep and then its report, end to end.
#
#   scripts/regenerate_figures.sh STUDY [overrides...]
#   scripts/regenerate_figures.sh all_smoke
#
# STUDY is an experiment in qeval/configs/experiment/ (qllm_eval_w, qllm_eval_wa, qllm_eval_kv, kivi,
# gear, h2o, or any *_smoke variant); all_smoke runs every smoke variant into one directory.
# Environment:
#   LAUNCHER     basic (one process, default) | local (parallel subprocesses) | slurm
#   RESULTS_DIR  where rows, tables and figures go (default: results/<study>)
# Finished cells are skipped, failed ones redone, so rerunning after a crash only does what is
# missing. With LAUNCHER=slurm the command waits for the job array: run it inside tmux or screen
# on the login node, e.g. LAUNCHER=slurm scripts/regenerate_figures.sh kivi hydra.launcher.partition=gpu
set -euo pipefail

study=${1:?usage: scripts/regenerate_figures.sh STUDY [overrides...]  (STUDY: an experiment name or all_smoke)}
shift
launcher=${LAUNCHER:-basic}
results=$(realpath -m "${RESULTS_DIR:-results/$study}")
cd "$(dirname "$0")/.."

if [[ $study == all_smoke ]]; then
  studies=(qllm_eval_w_smoke qllm_eval_wa_smoke qllm_eval_kv_smoke kivi_smoke gear_smoke h2o_smoke)
else
  studies=("$study")
fi

status=0
for s in "${studies[@]}"; do
  echo "== sweep $s -> $results"
  python -m qeval "experiment=$s" "hydra/launcher=$launcher" "results_dir=$results" "$@" || status=$?
done
echo "== report $results/report"
python -m qeval.report "$results"
exit $status
