#!/bin/bash
# Session 5: the 8B shape with the session's default buckets (192 added), alone on the machine.
# GPU 0: mixed with SKIP_TEMP (first, on a cold compilation cache: its start-up is the cold
# start), mixed with XLA's default command-buffer mode, mixed with SKIP_TEMP again, fixed,
# latency; then mixed at tp=2 on both GPUs with SKIP_TEMP. (In the lease, SKIP_TEMP came from an
# import-time default of jaxpaged that was then reverted; the same flag is set explicitly here.)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-defaults}; mkdir -p $OUT
quiet() { grep -v "^W1\|rematerial\|Warning\|warn(\|^ *$"; }
export CUDA_VISIBLE_DEVICES=0
SKIP=--xla_gpu_command_buffer_update_mode=SKIP_TEMP
cd scripts
common="--model-shape llama3-8b --num-kv-blocks 24000 --max-model-len 2048 --no-progress"
run() {  # name, then extra flags
  local name=$1; shift
  python benchmark_throughput.py $common "$@" --json $OUT/$name.json > $OUT/$name.log 2>&1
  echo "== $name $*"; quiet < $OUT/$name.log | grep "^jaxpaged\|busy\|by token bucket\|dispatch\|start-up" | cut -c1-260
}
XLA_FLAGS=$SKIP run mixed-1 --workload mixed
run mixed-xla-default --workload mixed --no-replay
XLA_FLAGS=$SKIP run mixed-2 --workload mixed --no-replay
XLA_FLAGS=$SKIP run fixed --workload fixed --no-replay
XLA_FLAGS=$SKIP python benchmark_latency.py --model-shape llama3-8b --max-model-len 2048 --max-num-seqs 256 \
  --num-kv-blocks 24000 --prompt-lens 128,512,1024 --json $OUT/latency.json 2>&1 | quiet | tail -8
XLA_FLAGS=$SKIP CUDA_VISIBLE_DEVICES=0,1 run mixed-tp2 --workload mixed -tp 2 --no-replay
