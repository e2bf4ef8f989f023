#!/bin/bash
# Tensor parallelism with the whole step in one CUDA graph per GPU (session 4, docs/parallel.md):
# XLA_FLAGS $COLL = SKIP_TEMP + collectives inside command buffers + XLA's one-shot all-reduce
# kernel off (its fusions split the graph; NCCL's kernels are captured). On the 4-GPU machine:
#   wave 1: 8B mixed tp=2 with $COLL (GPUs 0,1) beside tp=2 with SKIP_TEMP alone (GPUs 2,3)
#   wave 2: 8B mixed tp=1 with SKIP_TEMP (GPU 0) beside tp=1 XLA default (GPU 1), pools sized from memory
#   then 70B tp=4 latency and mixed with $COLL.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-coll}; mkdir -p $OUT
quiet() { grep -v "^W1\|rematerial\|Warning\|warn(\|^ *$"; }
skip=--xla_gpu_command_buffer_update_mode=SKIP_TEMP
COLL=${COLL:-$skip --xla_gpu_enable_command_buffer=+COLLECTIVES --xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false}
cd scripts
mixed8b() {  # devices, flags, tag, extra args
  CUDA_VISIBLE_DEVICES=$1 XLA_FLAGS="$2" timeout 200 python benchmark_throughput.py --model-shape llama3-8b \
    --workload mixed --max-model-len 2048 -tp $(($(echo $1 | tr -cd , | wc -c) + 1)) --no-progress $4 \
    --json $OUT/$3.json > $OUT/$3.log 2>&1
}
show() { for t in "$@"; do echo "######## $t"; quiet < $OUT/$t.log | tail -8; done; }
mixed8b 0,1 "$COLL" x4-8b-mixed-tp2-coll "--num-kv-blocks 24000" & mixed8b 2,3 "$skip" x4-8b-mixed-tp2-skip "--num-kv-blocks 24000" & wait
show x4-8b-mixed-tp2-coll x4-8b-mixed-tp2-skip
mixed8b 0 "$skip" x4-8b-mixed-tp1-skip "" & mixed8b 1 "" x4-8b-mixed-tp1 "" & wait
show x4-8b-mixed-tp1-skip x4-8b-mixed-tp1
echo "######## 70B tp=4, XLA_FLAGS=$COLL"
XLA_FLAGS="$COLL" timeout 150 python benchmark_latency.py --model-shape llama3-70b -tp 4 --max-model-len 2048 \
  --max-num-seqs 256 --num-kv-blocks 40000 --batches 1,8 --prompt-lens 512 --json $OUT/x4-70b-latency-coll.json \
  2>&1 | quiet | tail -7
XLA_FLAGS="$COLL" timeout 180 python benchmark_throughput.py --model-shape llama3-70b -tp 4 --max-model-len 2048 \
  --workload mixed --no-replay --no-progress --json $OUT/x4-70b-mixed-coll.json 2>&1 | quiet | tail -7
