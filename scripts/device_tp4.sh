#!/bin/bash
# Llama-3-70B shape at tp=4 on the 4-GPU machine, one lease: batch-1/8 decode latency with XLA's
# SKIP_TEMP command-buffer update mode, without and with the collectives inside the command
# buffers (one CUDA graph per GPU per step instead of one per segment between all-reduces),
# then mixed throughput with the faster setting and the KV pool sized from memory (no
# --num-kv-blocks; under SKIP_TEMP the budget comes from the CUDA driver). Logs and JSON in $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-tp4}; mkdir -p $OUT
quiet() { grep -v "^W1\|rematerial\|Warning\|warn("; }
skip=--xla_gpu_command_buffer_update_mode=SKIP_TEMP
cb=""
for c in "+COLLECTIVES" "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,COLLECTIVES"; do
  if XLA_FLAGS="--xla_gpu_enable_command_buffer=$c" python -c "import jax, jax.numpy as j; jax.jit(lambda x: x + 1)(j.ones(3)).block_until_ready()" >/dev/null 2>&1; then cb=$c; break; fi
done
echo "command buffer list accepted: ${cb:-none}"
cd scripts
declare -A itl
for tag in skip coll; do
  flags=$skip; [ $tag = coll ] && { [ -z "$cb" ] && continue; flags="$skip --xla_gpu_enable_command_buffer=$cb"; }
  echo "######## 70B tp=4 latency, XLA_FLAGS=$flags"
  XLA_FLAGS="$flags" timeout 180 python benchmark_latency.py --model-shape llama3-70b -tp 4 --max-model-len 2048 \
    --max-num-seqs 256 --num-kv-blocks 40000 --batches 1,8 --prompt-lens 512 --json $OUT/x4-70b-latency-$tag.json \
    2>&1 | quiet | tee $OUT/latency-$tag.log | tail -8
  itl[$tag]=$(grep "decode ITL, batch 1 " $OUT/latency-$tag.log | awk '{print $5}')
done
best=skip; flags=$skip
if [ -n "${itl[coll]}" ] && python -c "import sys; sys.exit(not float('${itl[coll]}') < float('${itl[skip]:-1e9}'))"; then
  best=coll; flags="$skip --xla_gpu_enable_command_buffer=$cb"
fi
echo "######## 70B tp=4 mixed, $best: XLA_FLAGS=$flags, KV pool from memory"
XLA_FLAGS="$flags" timeout 220 python benchmark_throughput.py --model-shape llama3-70b -tp 4 --max-model-len 2048 \
  --workload mixed --no-replay --no-progress --json $OUT/x4-70b-mixed-$best.json 2>&1 | quiet | tee $OUT/mixed.log | tail -9
