#!/bin/bash
# Session 9: the cold start's compile timeline (engine.startup["compiles"]): 8B, tp=1, empty
# compilation cache each run, short mixed run (32 prompts); RUNS labels the runs, a label
# `tN` runs with N compile threads (default: one per core).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-cold}; mkdir -p $OUT
cd scripts
nproc
for run in ${RUNS:-a b}; do
  flag=$([[ $run == t* ]] && echo "--compile-threads ${run#t}")
  CUDA_VISIBLE_DEVICES=0 timeout 200 python benchmark_throughput.py --model-shape llama3-8b --workload mixed \
    --num-prompts 32 --num-kv-blocks 24000 --max-model-len 2048 --no-progress --no-replay $flag ${EXTRA:-} \
    --compilation-cache /tmp/cache-cold-$run --json $OUT/cold-$run.json > $OUT/cold-$run.log 2>&1
  echo "== run $run (rc $?)"; grep "start-up\|startup\|compile events" $OUT/cold-$run.log
done
