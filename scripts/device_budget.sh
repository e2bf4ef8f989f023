#!/bin/bash
# Session 10 (nvidia-h200-x2, GPU 0): the token budget per step. vLLM's `LLM` class uses
# max_num_batched_tokens 16384 on GPUs of >= 70 GiB (server: 8192); jaxpaged's benchmarks ran
# 2048. Fixed and mixed at 2048 / 8192 / 16384 in one lease, the first run from an empty
# compilation cache (the committed start-up order's cold start), then fixed with 32-token blocks.
# All logs in $OUT/all.log (summary lines), JSON per run.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-budget}; mkdir -p $OUT
cd scripts
run() {  # name, extra args...
  local name=$1; shift
  CUDA_VISIBLE_DEVICES=0 timeout 150 python benchmark_throughput.py --model-shape llama3-8b \
    --num-kv-blocks 24000 --max-model-len 2048 --no-progress --compilation-cache /tmp/cache-s10 \
    --json $OUT/$name.json "$@" > /tmp/$name.log 2>&1
  echo "== $name: $* (rc $?)" | tee -a $OUT/all.log
  grep -A1 "^engine" /tmp/$name.log | tail -1 | tee -a $OUT/all.log
  grep "device busy\|^start-up {\|start-up programs\|by token bucket\|host ms per step\|steps, " /tmp/$name.log >> $OUT/all.log
  grep -i "error\|Traceback" /tmp/$name.log | head -5 >> $OUT/all.log
}
run f2048 --workload fixed
run f8192 --workload fixed --max-num-batched-tokens 8192
run f16384 --workload fixed --max-num-batched-tokens 16384
run m2048 --workload mixed
run m8192 --workload mixed --max-num-batched-tokens 8192
run m16384 --workload mixed --max-num-batched-tokens 16384
run f8192b32 --workload fixed --max-num-batched-tokens 8192 --block-size 32 --num-kv-blocks 12000
