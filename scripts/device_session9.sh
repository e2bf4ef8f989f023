#!/bin/bash
# Session 9 closing runs (nvidia-h200-x2, GPU 0): fixed workload from an empty compilation
# cache (cold start with one compile pool and cuBLAS prefill forwards), then mixed (warm cache).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-s9}; mkdir -p $OUT
cd scripts
for w in fixed mixed; do
  CUDA_VISIBLE_DEVICES=0 timeout 240 python benchmark_throughput.py --model-shape llama3-8b --workload $w \
    --num-kv-blocks 24000 --max-model-len 2048 --no-progress --compilation-cache /tmp/cache-s9 \
    --json $OUT/$w.json > $OUT/$w.log 2>&1
  echo "== $w (rc $?)"; grep -A3 "^engine" $OUT/$w.log; grep "device busy\|start-up\|startup\|by token bucket" $OUT/$w.log
done
