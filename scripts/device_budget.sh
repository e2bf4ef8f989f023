#!/bin/bash
# Session 10 (nvidia-h200-x2, GPU 0): the token budget per step. vLLM's `LLM` class uses
# max_num_batched_tokens 16384 on GPUs of >= 70 GiB (server: 8192); jaxpaged's benchmarks ran
# 2048. Fixed and mixed at 2048 / 8192 / 16384 in one lease, the first run from an empty
# compilation cache (the committed start-up order's cold start), then fixed with 32-token blocks.
# (16384 ran out of memory in the `full` head here; fixed since: device_budget2.sh.)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-budget}; mkdir -p $OUT
cd scripts; source bench_run.sh; BENCH_TIMEOUT=150
pool="--num-kv-blocks 24000"
bench f2048 0 $pool --workload fixed
bench f8192 0 $pool --workload fixed --max-num-batched-tokens 8192
bench f16384 0 $pool --workload fixed --max-num-batched-tokens 16384
bench m2048 0 $pool --workload mixed
bench m8192 0 $pool --workload mixed --max-num-batched-tokens 8192
bench m16384 0 $pool --workload mixed --max-num-batched-tokens 16384
bench f8192b32 0 --workload fixed --max-num-batched-tokens 8192 --block-size 32 --num-kv-blocks 12000
