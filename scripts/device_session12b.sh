#!/bin/bash
# Session 12, second lease (nvidia-h200): the f32 in-model kernel test with its GPU tolerance,
# then the 8B batch-1 / batch-8 decode latency and TTFT(512) of the current code (issue 6's
# latency targets, last measured in session 7). Logs and JSON under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-s12b}; mkdir -p $OUT
timeout 200 python -m pytest -q -p no:cacheprovider tests/test_paged_attention_kernel.py -k "in_model or decode" \
  2>&1 | tee $OUT/kernel-tests-b.log | tail -3
cd scripts
timeout 300 python benchmark_latency.py --model-shape llama3-8b --max-model-len 2048 --num-kv-blocks 24000 \
  --batches 1,8 --prompt-lens 128,512,1024 --json $OUT/latency.json 2>&1 | grep -v "^W1\|warn" | tee $OUT/latency.log | tail -12
