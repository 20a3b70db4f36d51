#!/usr/bin/env bash
# The GPU figures of docs/performance.md ("On a GPU") in one command, sized for a short loan of one GPU:
#
#   bash benchmarks/gpu_figures.sh [OUT_DIR] [SECONDS]      (defaults: runs/gpu_figures, 450)
#
# with gram_pyro importable by $PYTHON (default: python3).
# Phase 1 runs every compiled configuration at once, to fill the compile cache and record each one's
# cold compile time (the first batch from an empty cache; its step times are not used: the processes
# share the GPU), and the CUDA tests of the compiled step. Phase 2 then times each configuration alone,
# in order of importance, each cut at its own limit or at SECONDS from the start. At the end the training
# rows are merged into OUT_DIR/throughput-gpu.json (docs/results/throughput-gpu.json is this file).
set -u
PY=${PYTHON:-python3}
OUT_DIR=${1:-runs/gpu_figures}; T=${2:-450}
mkdir -p "$OUT_DIR"; LOG=$OUT_DIR/log.txt; : > "$LOG"
TS=benchmarks/training_speed.py; SA=benchmarks/sampling.py
PAPER="--dims 512 --batches 768 --ffn-ratio 1"; SMALL="--dims 64 --batches 256 --ffn-ratio 2"
SAMPLING="--batch 16 --widths 1 8 64 --precision auto --repeats 2 model=gram_paper"
start=$SECONDS

( timeout 180 $PY -m pytest -q -x -p no:cacheprovider tests/test_compile.py > "$OUT_DIR/pytest.txt" 2>&1
  echo "pytest exit $?" >> "$OUT_DIR/pytest.txt" ) &
for mode in default max; do
  timeout 180 $PY $TS $PAPER --compile $mode --repeats 1 --json "$OUT_DIR/cold-paper-$mode.json" model=gram_paper \
    > "$OUT_DIR/cold-paper-$mode.txt" 2>&1 &
  timeout 180 $PY $TS $SMALL --compile $mode --repeats 1 --json "$OUT_DIR/cold-d64-$mode.json" \
    > "$OUT_DIR/cold-d64-$mode.txt" 2>&1 &
done
wait
for f in "$OUT_DIR"/pytest.txt "$OUT_DIR"/cold-*.txt; do echo "== $f"; tail -n 4 "$f"; done >> "$LOG"
echo "phase 1: $((SECONDS - start)) s" >> "$LOG"

stage() {  # stage NAME LIMIT COMMAND...: run alone, cut at LIMIT seconds or at T from the start
  local name=$1 limit=$2; shift 2
  local left=$((T - (SECONDS - start) - 15)); [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then echo "== $name skipped: no time left" >> "$LOG"; return; fi
  echo "== $name (limit $limit s)" >> "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1; echo "exit $? at $((SECONDS - start)) s" >> "$LOG"
}
stage paper-none 60 $PY $TS $PAPER --compile none --json "$OUT_DIR/paper-none.json" model=gram_paper
stage paper-default 75 $PY $TS $PAPER --compile default --json "$OUT_DIR/paper-default.json" model=gram_paper
stage d64-none 30 $PY $TS $SMALL --compile none --json "$OUT_DIR/d64-none.json"
stage d64-default 45 $PY $TS $SMALL --compile default --json "$OUT_DIR/d64-default.json"
stage sampling-none 60 $PY $SA $SAMPLING --compile none
stage sampling-default 70 $PY $SA $SAMPLING --compile default
stage paper-max 90 $PY $TS $PAPER --compile max --json "$OUT_DIR/paper-max.json" model=gram_paper
stage d64-max 60 $PY $TS $SMALL --compile max --json "$OUT_DIR/d64-max.json"
runs=$(ls "$OUT_DIR"/paper-{none,default,max}.json "$OUT_DIR"/d64-{none,default,max}.json 2>/dev/null)
cold=$(ls "$OUT_DIR"/cold-*.json 2>/dev/null)
[ -n "$runs" ] && $PY benchmarks/merge_throughput.py "$OUT_DIR/throughput-gpu.json" $runs --cold $cold >> "$LOG"
echo "total $((SECONDS - start)) s" >> "$LOG"
cat "$LOG"
