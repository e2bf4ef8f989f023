#!/bin/bash
# Session 5: the 192-token bucket (default token buckets) against powers of two only, 8B mixed,
# alone on the machine: tp=1 on GPU 0 (default first, on a cold compilation cache: its start-up
# is the cold start), twice each alternating; then tp=2 on both GPUs with SKIP_TEMP, once each.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-buckets}; mkdir -p $OUT
quiet() { grep -v "^W1\|rematerial\|Warning\|warn(\|^ *$"; }
cd scripts
common="--model-shape llama3-8b --workload mixed --num-kv-blocks 24000 --max-model-len 2048 --no-progress"
POW2="--token-buckets 16,32,64,128,256,512,1024,2048"
run() {  # name, then extra flags
  local name=$1; shift
  python benchmark_throughput.py $common "$@" --json $OUT/$name.json > $OUT/$name.log 2>&1
  echo "== $name $*"; quiet < $OUT/$name.log | grep "^jaxpaged\|busy\|by token bucket\|dispatch" | cut -c1-300
}
export CUDA_VISIBLE_DEVICES=0
run tp1-default-1
run tp1-pow2-1 $POW2
run tp1-default-2 --no-replay
run tp1-pow2-2 --no-replay $POW2
export CUDA_VISIBLE_DEVICES=0,1 XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP
run tp2-default -tp 2 --no-replay
run tp2-pow2 -tp 2 --no-replay $POW2
grep -h "startup" $OUT/tp1-default-1.log | head -2
