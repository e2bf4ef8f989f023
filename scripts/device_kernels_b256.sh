#!/bin/bash
# Session 6: the per-sequence (decode) kernel at batch 256 on an engine-sized pool (64-bit
# offsets), contexts 512 and mixed, with the tile sweep; then a prefill step's attention in the
# engine's padded 2048-token bucket (fused vs split launch).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-kernels}; mkdir -p $OUT
cd scripts
python bench_kernels.py --only checks,decode,bucket --decode-batch 256 --decode-ctx 512,mixed --decode-layers 32 \
  --sweep 2>&1 | grep -v "^W1\|Warning\|warn(" | tee $OUT/kernels-b256-session6.log | grep "^check\|^checks\|copy\|^|"
