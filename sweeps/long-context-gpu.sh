#!/usr/bin/env bash
# sweeps/long-context.yaml on one GPU in under 8 minutes: its 19 jobs split over 13 processes that share
# the GPU (small-batch decoding is launch-bound, so processes overlap), each part stopped at $LIMIT
# seconds; then one collect over all jobs, the leaderboard and the report, copied into $OUT. Job ids
# are the full sweep's (a part only narrows the grid) and results live in $RESULTS (outside $OUT), so
# running the script again on the same machine resumes: finished jobs are skipped.
#   OUT=/some/dir bash sweeps/long-context-gpu.sh   # -> $OUT/long-context/{REPORT.md,leaderboard.*,rows.parquet,runs/}
# STEP=parts prints each part's command line instead of running it (for a job queue that shares the GPU
# with other sweeps: scripts/gpu_session.sh queue); STEP=collect runs only the final collect and report.
set -u
STEP=${STEP:-all}
OUT=${OUT:?set OUT to the output folder}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export MLA_HARNESS_CACHE=${MLA_HARNESS_CACHE:-/tmp/mla-harness-cache}  # benchmarks, statistics: not in $OUT
PY=${PY:-python}
S=sweeps/long-context.yaml
R=${RESULTS:-/tmp/long-context-results}  # kept between calls on a warm machine: a rerun resumes
LIMIT=${LIMIT:-400}
# MODEL=gemma3-270m: the same grid on Gemma-3-270M (its own results folder, long-context-gemma3-270m; its
# 32k context lets RULER run to 16k tokens as well)
# Gemma-3 has sliding-window layers, which transformers' QuantizedCache (and so kv_quant) does not
# cover: its grid is the unquantized rows only (QUANT=0)
MODEL=${MODEL:-smollm2-135m}
NAME=long-context
M=()
QUANT=1
if [ "$MODEL" != smollm2-135m ]; then
  NAME=long-context-$MODEL
  M=(--set "models=[$MODEL]" --set 'eval.task_metadata={max_seq_lengths: [1024, 2048, 4096, 8192, 16384], num_samples: 4}'
     --set eval.batch_size=4)
  QUANT=0
fi
Q8='{bits: 8, group: 64, residual: 128}'
Q4='{bits: 4, group: 64, residual: 128}'
Q2='{bits: 2, group: 64, residual: 128}'
Q75="none, $Q8" Q87="none, $Q4"  # MLA 75 % (+ int8), MLA 87.5 % (+ int4)
[ "$QUANT" = 1 ] || Q75=none Q87=none
mkdir -p "$R" "$OUT/logs"
part() {  # part NAME --set ...: one process over a slice of the grid
  local name=$1
  shift
  if [ "$STEP" = parts ]; then  # one line a queue can run: same command, its log beside the others
    printf 'timeout %q %q -m harness sweep %q --results %q --no-leaderboard --set name=%q' \
      "$LIMIT" "$PY" "$S" "$R" "$NAME"
    printf ' %q' "${M[@]}" "$@"
    printf ' > %q 2>&1\n' "$OUT/logs/${PREFIX:-}$name.log"
    return
  fi
  [ "$STEP" = collect ] && return
  timeout "$LIMIT" "$PY" -m harness sweep "$S" --results "$R" --no-leaderboard --set name="$NAME" "${M[@]}" "$@" \
    > "$OUT/logs/${PREFIX:-}$name.log" 2>&1 &
}
part original --set 'methods=[]' --set 'kv_quant=[none]'
if [ "$QUANT" = 1 ]; then
  part original-int8 --set 'methods=[]' --set "kv_quant=[$Q8]"
  part original-int4 --set 'methods=[]' --set "kv_quant=[$Q4]"
  part original-int2 --set 'methods=[]' --set "kv_quant=[$Q2]"
fi
for m in care_joint care_mla mha2mla; do
  one=(--set baseline=false --set "methods=[{name: $m}]")
  part "$m-50" "${one[@]}" --set 'budgets=[{kv_save: 0.5}]' --set 'kv_quant=[none]'
  part "$m-75" "${one[@]}" --set 'budgets=[{kv_save: 0.75}]' --set "kv_quant=[$Q75]"
  part "$m-87.5" "${one[@]}" --set 'budgets=[{kv_save: 0.875}]' --set "kv_quant=[$Q87]"
done
[ "$STEP" = parts ] && exit 0
wait
"$PY" -m harness sweep "$S" --results "$R" --dry-run --set name="$NAME" "${M[@]}" > "$OUT/logs/collect.log" 2>&1  # rows.parquet of all jobs
"$PY" -m harness leaderboard "$R/$NAME" > "$OUT/logs/leaderboard.log" 2>&1
"$PY" -m harness.reports.longctx "$R/$NAME" --machine "${MACHINE:-one lent GPU, bf16, 13 processes sharing it}"
cp -r "$R/$NAME" "$OUT/"
grep -ho "\[\(ok\|failed\)\] [^|]*" "$OUT"/logs/*.log | sort  # what finished, what failed
