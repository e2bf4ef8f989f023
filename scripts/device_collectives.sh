#!/bin/bash
# tp=2 mixed throughput with the step's all-reduces inside XLA's CUDA graphs (command buffers)
# on top of SKIP_TEMP: at tp=2 the step's graph is cut at every collective (docs/parallel.md).
# Probes which spelling of the command-buffer list this XLA accepts first.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-coll}; mkdir -p $OUT
base=--xla_gpu_command_buffer_update_mode=SKIP_TEMP
for cb in "+COLLECTIVES" "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,COLLECTIVES"; do
  if XLA_FLAGS="--xla_gpu_enable_command_buffer=$cb" python -c "import jax, jax.numpy as j; jax.jit(lambda x: x + 1)(j.ones(3)).block_until_ready()" >/dev/null 2>&1; then break; fi
  cb=""
done
echo "command buffer list accepted: ${cb:-none}"
[ -z "$cb" ] && exit 1
cd scripts
XLA_FLAGS="$base --xla_gpu_enable_command_buffer=$cb" python benchmark_throughput.py --model-shape llama3-8b \
  --workload mixed --num-kv-blocks 24000 --max-model-len 2048 -tp 2 --no-progress --no-replay \
  --json $OUT/x2-8b-mixed-tp2-collectives.json 2>&1 | grep -v "^W1\|rematerial" | tail -8
