#!/bin/bash
# Session 9: are the Triton GEMM autotuning candidates what serialises the parallel forward
# compiles, and do the prefill buckets lose anything with cuBLAS GEMMs only? 8B, GPU 0.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-compile2}; mkdir -p $OUT
cd scripts
for s in default no_triton_gemm; do
  CUDA_VISIBLE_DEVICES=0 timeout 120 python exp_compile.py --model-shape llama3-8b --threads 9 --set $s \
    --buckets 16,32,64,128,192,256,512,1024,2048 >> $OUT/compile2.log 2>&1; echo "rc $?" >> $OUT/compile2.log
done
for s in default no_triton_gemm; do
  CUDA_VISIBLE_DEVICES=0 timeout 120 python exp_xla_options.py --model-shape llama3-8b --set $s \
    --buckets 512,1024,2048 >> $OUT/runtime2.log 2>&1; echo "rc $?" >> $OUT/runtime2.log
done
grep -h "^jax\|^  forward\|^RESULT\|^rc" $OUT/compile2.log $OUT/runtime2.log
