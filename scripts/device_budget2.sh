#!/bin/bash
# Session 10, second lease (nvidia-h200-x2): the 16384-token budget once the `full` head's
# prompt logprobs are chunked (fixed from an empty cache: that configuration's cold start; mixed
# with the pool sized from memory), then multi-step decode (K=8) at tp=1 and tp=2 with an
# 8192-token budget (the tp ratio). Summary lines in $OUT/all.log, JSON per run.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-budget2}; mkdir -p $OUT
cd scripts; source bench_run.sh
pool="--num-kv-blocks 24000"
bench f16384 0 $pool --workload fixed --max-num-batched-tokens 16384
bench m16384-mem 0 --workload mixed --max-num-batched-tokens 16384
bench m8192-k8 0 $pool --workload mixed --max-num-batched-tokens 8192 --num-scheduler-steps 8
bench m8192-k8-tp2 0,1 $pool --workload mixed --max-num-batched-tokens 8192 --num-scheduler-steps 8 -tp 2
