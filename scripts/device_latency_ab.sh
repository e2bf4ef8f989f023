#!/bin/bash
# Session 6: latency (8B shape, batch-1 ITL, TTFT of 128/512/1024-token prompts) with this package,
# then with the previous one (.exp/old: see device_empty_programs.sh), on one GPU.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/jaxpaged-latency}; mkdir -p $OUT
ROOT=$PWD OLD=${OLD:-$PWD/.exp/old}
cd scripts
for v in new old; do
  pp=$([ $v = old ] && echo $OLD || echo $ROOT)
  PYTHONPATH=$pp python benchmark_latency.py --model-shape llama3-8b --max-model-len 2048 --max-num-seqs 256 \
    --num-kv-blocks 24000 --batches 1 --prompt-lens 128,512,1024 --json $OUT/latency-$v.json > $OUT/latency-$v.log 2>&1
  echo "== $v"; grep -i "ms\b\|ITL\|TTFT" $OUT/latency-$v.log | grep -v "^W1\|warn" | tail -8
done
