#!/bin/bash
# Session 5: decode-step device time on the 8B shape. GPU 1: the kernel checks, then the decode
# kernel at batch 256 (contexts 512 / 1024, blocks of 16 / 32 tokens) with the tile sweep, which
# then included several KV heads per program (a kernel variant, reverted). GPU 0, at the same
# time: mixed throughput with the default token buckets (192 between 128 and 256) against
# powers of two only, twice each.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-decode}; mkdir -p $OUT
quiet() { grep -v "^W1\|rematerial\|Warning\|warn(\|^ *$"; }
cd scripts
(CUDA_VISIBLE_DEVICES=1 python bench_kernels.py --only checks,decode --decode-batch 256 --decode-ctx 512,1024 \
  --decode-block-size 16,32 --sweep > $OUT/kernels.log 2>&1) &
common="--model-shape llama3-8b --workload mixed --num-kv-blocks 24000 --max-model-len 2048 --no-progress"
POW2=16,32,64,128,256,512,1024,2048
for run in 1 2; do
  replay=$([ $run = 2 ] && echo --no-replay)
  CUDA_VISIBLE_DEVICES=0 python benchmark_throughput.py $common $replay --json $OUT/mixed-default-$run.json \
    > $OUT/mixed-default-$run.log 2>&1
  CUDA_VISIBLE_DEVICES=0 python benchmark_throughput.py $common $replay --token-buckets $POW2 \
    --json $OUT/mixed-pow2-$run.json > $OUT/mixed-pow2-$run.log 2>&1
done
wait
for f in $OUT/mixed-*.log; do echo "== $f"; quiet < $f | tail -9 | cut -c1-400; done
grep "^check\|^checks\|copy" $OUT/kernels.log
grep "^|" $OUT/kernels.log | grep -v "jax pallas"
