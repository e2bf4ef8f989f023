#!/bin/bash
# Session 9: what serialises the warm-up's parallel forward compiles (scripts/exp_compile.py)?
# 8B, GPU 0, six decode buckets: one after the other, in 6 threads, and in 6 threads with
# compile options; one process each.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-compile}; mkdir -p $OUT
cd scripts
run() {  # threads set
  CUDA_VISIBLE_DEVICES=0 timeout 200 python exp_compile.py --model-shape llama3-8b --threads $1 --set $2 \
    >> $OUT/compile.log 2>&1; echo "rc $?" >> $OUT/compile.log
}
run 1 default
run 6 default
for s in ${SETS:-llvm_parallel nvptx_lib no_nvptx_lib autotune0}; do run 6 $s; done
grep -v "^W\|^I\|Warn\|warn" $OUT/compile.log
