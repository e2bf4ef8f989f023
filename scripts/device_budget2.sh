#!/bin/bash
# Session 10, second lease (nvidia-h200-x2): the 16384-token budget once the `full` head's
# prompt logprobs are chunked (fixed from an empty cache: that configuration's cold start; mixed
# with the pool sized from memory), then multi-step decode (K=8) at tp=1 and tp=2 with an
# 8192-token budget (the tp ratio). Summary lines in $OUT/all.log, JSON per run.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-budget2}; mkdir -p $OUT
cd scripts
run() {  # name, GPUs, extra args...
  local name=$1 gpus=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpus timeout 170 python benchmark_throughput.py --model-shape llama3-8b \
    --max-model-len 2048 --no-progress --compilation-cache /tmp/cache-s10 \
    --json $OUT/$name.json "$@" > /tmp/$name.log 2>&1
  echo "== $name: GPUs $gpus $* (rc $?)" | tee -a $OUT/all.log
  grep -A1 "^engine" /tmp/$name.log | tail -1 | tee -a $OUT/all.log
  grep "device busy\|^start-up {\|start-up programs\|by token bucket\|host ms per step\|steps, " /tmp/$name.log >> $OUT/all.log
  grep -i "error\|Traceback" /tmp/$name.log | head -5 >> $OUT/all.log
}
run f16384 0 --workload fixed --num-kv-blocks 24000 --max-num-batched-tokens 16384
run m16384-mem 0 --workload mixed --max-num-batched-tokens 16384
run m8192-k8 0 --workload mixed --num-kv-blocks 24000 --max-num-batched-tokens 8192 --num-scheduler-steps 8
run m8192-k8-tp2 0,1 --workload mixed --num-kv-blocks 24000 --max-num-batched-tokens 8192 --num-scheduler-steps 8 -tp 2
