#!/bin/bash
# Session 10: fixed at 16384 and 2048 tokens per step, alternating twice in one lease (warm
# compilation cache from device_session10.sh), to separate the budget from run-to-run host noise.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-s10b}; mkdir -p $OUT
cd scripts
for i in 1 2; do for b in 16384 2048; do
  CUDA_VISIBLE_DEVICES=0 timeout 120 python benchmark_throughput.py --model-shape llama3-8b --workload fixed \
    --num-kv-blocks 24000 --max-model-len 2048 --no-progress --compilation-cache /tmp/cache-s10 \
    --max-num-batched-tokens $b --json $OUT/fixed-$b-$i.json > /tmp/f.log 2>&1
  echo "== fixed $b run $i (rc $?)"; grep -A1 "^engine" /tmp/f.log | tail -1; grep "device busy" /tmp/f.log
done; done
