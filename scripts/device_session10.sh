#!/bin/bash
# Session 10 closing runs (one GPU): fixed and mixed with vLLM's `LLM`-class token budget for
# >= 70 GiB GPUs (16384; the fixed run first, from an empty compilation cache), then both at
# jaxpaged's default 2048 in the same lease. Summary lines in $OUT/all.log, JSON per run.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-s10}; mkdir -p $OUT
cd scripts; source bench_run.sh
pool="--num-kv-blocks 24000"
bench fixed-16384 0 $pool --workload fixed --max-num-batched-tokens 16384
bench mixed-16384 0 $pool --workload mixed --max-num-batched-tokens 16384
bench fixed-2048 0 $pool --workload fixed
bench mixed-2048 0 $pool --workload mixed
