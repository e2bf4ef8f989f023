#!/bin/bash
# Session 10 closing runs (one GPU): fixed and mixed with vLLM's `LLM`-class token budget for
# >= 70 GiB GPUs (16384; the fixed run first, from an empty compilation cache), then both at
# jaxpaged's default 2048 in the same lease. Summary lines in $OUT/all.log, JSON per run.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-s10}; mkdir -p $OUT
cd scripts
run() {  # name, extra args...
  local name=$1; shift
  CUDA_VISIBLE_DEVICES=0 timeout 170 python benchmark_throughput.py --model-shape llama3-8b \
    --num-kv-blocks 24000 --max-model-len 2048 --no-progress --compilation-cache /tmp/cache-s10 \
    --json $OUT/$name.json "$@" > /tmp/$name.log 2>&1
  echo "== $name: $* (rc $?)" | tee -a $OUT/all.log
  grep -A1 "^engine" /tmp/$name.log | tail -1 | tee -a $OUT/all.log
  grep "ceilings\|device busy\|^start-up {\|start-up programs\|by token bucket\|host ms per step\|steps, " /tmp/$name.log >> $OUT/all.log
  grep -i "error\|Traceback" /tmp/$name.log | head -5 >> $OUT/all.log
}
run fixed-16384 --workload fixed --max-num-batched-tokens 16384
run mixed-16384 --workload mixed --max-num-batched-tokens 16384
run fixed-2048 --workload fixed
run mixed-2048 --workload mixed
