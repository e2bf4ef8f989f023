#!/bin/bash
# Session 10: fixed at 16384 and 2048 tokens per step, alternating twice in one lease (warm
# compilation cache from device_session10.sh), to separate the budget from run-to-run host
# noise; then fixed at 16384 with multi-step decode (K=8), twice.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-s10b}; mkdir -p $OUT
cd scripts; source bench_run.sh; BENCH_TIMEOUT=120
pool="--num-kv-blocks 24000"
for i in 1 2; do for b in 16384 2048; do
  bench fixed-$b-$i 0 $pool --workload fixed --max-num-batched-tokens $b
done; done
for i in 1 2; do bench fixed-16384-k8-$i 0 $pool --workload fixed --max-num-batched-tokens 16384 --num-scheduler-steps 8; done
