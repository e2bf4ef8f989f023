#!/bin/bash
# Session 8, x2 lease: multi-step decode (--num-scheduler-steps K) in the engine, 8B, K=1 against
# K=8 in the same lease. Each argument is a run: "name devices [xla=PRESET] benchmark-args...",
# PRESET one of skip (SKIP_TEMP) or onegraph (skip + collectives in the command buffers, NCCL
# instead of XLA's one-shot all-reduce: session 4's `one graph`); without
# arguments, the session's first call (from an empty compilation cache): mixed at tp=1
# (GPU 0) and tp=2 (both GPUs), K=1 and K=8, then fixed at tp=1 with K=8. JSON files go to
# $OUT, logs to /tmp/jaxpaged-multistep-engine.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-multistep-engine}; LOGS=/tmp/jaxpaged-multistep-engine; mkdir -p $OUT $LOGS
cd scripts
common="--model-shape llama3-8b --num-kv-blocks 24000 --max-model-len 2048 --no-progress"
skip="--xla_gpu_command_buffer_update_mode=SKIP_TEMP"
declare -A PRESETS=([skip]="$skip" [onegraph]="$skip --xla_gpu_enable_command_buffer=+COLLECTIVES \
--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false")
run() {  # name, devices, [xla=PRESET], extra args
  local name=$1 dev=$2 flags=""; shift 2
  [[ $1 == xla=* ]] && { flags=${PRESETS[${1#xla=}]}; shift; }
  CUDA_VISIBLE_DEVICES=$dev XLA_FLAGS="$flags" timeout 170 python benchmark_throughput.py $common "$@" \
    --json $OUT/$name.json > $LOGS/$name.log 2>&1 || { echo "== $name failed"; tail -5 $LOGS/$name.log; return; }
  echo "== $name"; python run_summary.py $OUT/$name.json; grep "device ms per step" $LOGS/$name.log | cut -c1-400
}
[ $# -gt 0 ] || set -- "mixed-k1 0 --workload mixed" "mixed-k8 0 --workload mixed --num-scheduler-steps 8" \
  "tp2-mixed-k1 0,1 --workload mixed -tp 2 --no-replay" \
  "tp2-mixed-k8 0,1 --workload mixed -tp 2 --no-replay --num-scheduler-steps 8" \
  "fixed-k8 0 --workload fixed --num-scheduler-steps 8"
for spec in "$@"; do
  run $spec
done
