#!/bin/bash
# Session 10 (nvidia-h200-x4): Llama-3-70B shape at tp=4 with the current code and session 4's
# `one graph` XLA flags: batch-1/8 decode latency, then mixed throughput with multi-step decode
# (K=8) and an 8192-token budget, the KV pool sized from memory. Logs and JSON in $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-tp4-s10}; mkdir -p $OUT
export XLA_FLAGS="--xla_gpu_command_buffer_update_mode=SKIP_TEMP --xla_gpu_enable_command_buffer=+COLLECTIVES \
--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false"
quiet() { grep -v "^W1\|rematerial\|Warning\|warn("; }
cd scripts
timeout 230 python benchmark_latency.py --model-shape llama3-70b -tp 4 --max-model-len 2048 --max-num-seqs 256 \
  --num-kv-blocks 40000 --batches 1,8 --prompt-lens 512 --json $OUT/x4-70b-latency-session10.json \
  2>&1 | quiet > $OUT/latency.log; echo "latency rc $?"; tail -12 $OUT/latency.log
timeout 300 python benchmark_throughput.py --model-shape llama3-70b -tp 4 --max-model-len 2048 --workload mixed \
  --max-num-batched-tokens 8192 --num-scheduler-steps 8 --no-replay --no-progress \
  --json $OUT/x4-70b-mixed-session10.json 2>&1 | quiet > $OUT/mixed.log; echo "mixed rc $?"
grep -A1 "^engine" $OUT/mixed.log; grep "steps, \|^start-up {\|host ms\|Error\|error" $OUT/mixed.log | head
