#!/bin/bash
# Session 5: the 192-token bucket on a device-bound host: 8B mixed on GPU 0 with the default
# buckets (first, cold compilation cache: the cold start), powers of two only, default again.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} CUDA_VISIBLE_DEVICES=0
OUT=${OUT:-/tmp/jaxpaged-buckets2}; mkdir -p $OUT
cd scripts
common="--model-shape llama3-8b --workload mixed --num-kv-blocks 24000 --max-model-len 2048 --no-progress --no-replay"
for name in default-1 pow2 default-2; do
  extra=$([ $name = pow2 ] && echo "--token-buckets 16,32,64,128,256,512,1024,2048")
  python benchmark_throughput.py $common $extra --json $OUT/mixed-$name.json > $OUT/mixed-$name.log 2>&1
  echo "== $name: $(grep '^jaxpaged ' $OUT/mixed-$name.log) $(grep -o 'dispatch [0-9.]*\|startup [0-9]* s' $OUT/mixed-$name.log | tr '\n' ' ')"
done
