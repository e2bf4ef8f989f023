#!/bin/bash
# Session 5: fixed workload (8B shape, GPU 0) with XLA's SKIP_TEMP command-buffer mode against
# XLA's default mode, alternating, twice each. (In the lease, SKIP_TEMP came from an import-time
# default of jaxpaged that was then reverted; the same flag is set explicitly here.)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} CUDA_VISIBLE_DEVICES=0
OUT=${OUT:-/tmp/jaxpaged-fixed-ab}; mkdir -p $OUT
SKIP=--xla_gpu_command_buffer_update_mode=SKIP_TEMP
cd scripts
for i in 1 2; do for mode in skip default; do
  XLA_FLAGS=$([ $mode = skip ] && echo $SKIP) python benchmark_throughput.py --model-shape llama3-8b \
    --num-kv-blocks 24000 --max-model-len 2048 --no-progress --workload fixed --no-replay \
    --json $OUT/fixed-$mode-$i.json > $OUT/fixed-$mode-$i.log 2>&1
  echo "== $mode run $i: $(grep '^jaxpaged ' $OUT/fixed-$mode-$i.log) $(grep -o 'dispatch [0-9.]*' $OUT/fixed-$mode-$i.log)"
done; done
