#!/usr/bin/env bash
# Every budget=gpu reproduction in one command, sized for a short loan of one GPU:
#
#   bash experiments/gpu_reproductions.sh [OUT_DIR] [SECONDS] [TASK ...]
#
# (defaults: runs/gpu_reproductions, 540, every task in the order below), with gram_pyro importable by
# $PYTHON (default: python3). WIDTH tasks (default 4) run at once, each a reproduction whose GRAM and TRM
# runs train side by side (jobs=2): at the recipes' size (D = 64) one process leaves the GPU idle between
# its kernel launches, so 2 x WIDTH processes share it. Each reproduction is cut at SECONDS from the start;
# one that finishes writes OUT_DIR/<task>/results.json, and OUT_DIR/<task>.tar.gz packs what another
# machine needs to publish it: results.json, the GRAM run's config, final checkpoint, metrics and
# held-out checks, and the reproduction's log. Publish there with
#   tar -xzf <task>.tar.gz -C runs/gpu_reproductions
#   cp runs/gpu_reproductions/<task>/results.json docs/results/<task>-gpu.json && python experiments/results_table.py
# Extra arguments for every reproduction come from $REPRODUCE_ARGS (a CPU dry run:
# REPRODUCE_ARGS="trainer.device=cpu trainer.max_batches=2 ...", as tests/test_reproduce.py does).
set -u
PY=${PYTHON:-python3}
OUT_DIR=${1:-runs/gpu_reproductions}; T=${2:-540}; shift $(( $# < 2 ? $# : 2 ))
TASKS=${*:-nqueens10 coloring sudoku digits coloring10 nqueens uncond_sudoku4 uncond_sudoku}
WIDTH=${WIDTH:-4}
mkdir -p "$OUT_DIR"
start=$SECONDS

reproduce() {  # reproduce TASK: the reproduction, cut at T from the start, then its pack
  local task=$1 left=$((T - (SECONDS - start))) dir=$OUT_DIR/$1
  if [ "$left" -lt 30 ]; then echo "$task: skipped, no time left"; return; fi
  mkdir -p "$dir"
  # shellcheck disable=SC2086  # REPRODUCE_ARGS is a list of key=value words
  timeout "$left" "$PY" experiments/reproduce.py "task=$task" budget=gpu jobs=2 "out=$dir" ${REPRODUCE_ARGS:-} \
    > "$dir/log.txt" 2>&1
  local status=$?
  if [ -f "$dir/results.json" ]; then
    tar -czf "$OUT_DIR/$task.tar.gz" -C "$OUT_DIR" "$task/results.json" "$task/log.txt" \
      "$task/gram/config.yaml" "$task/gram/checkpoint.pt" "$task/gram/metrics.csv" "$task/gram/eval.csv"
    echo "$task: done in $((SECONDS - start)) s"
  else
    echo "$task: exit $status at $((SECONDS - start)) s, no results; the end of its log:"
    tr '\r' '\n' < "$dir/log.txt" | grep -v 'it/s\]' | tail -n 5
  fi
}

running=0
for task in $TASKS; do
  if [ "$running" -ge "$WIDTH" ]; then wait -n; running=$((running - 1)); fi
  reproduce "$task" & running=$((running + 1))
done
wait
echo "total $((SECONDS - start)) s"
