#!/bin/bash
# Session 9: the prefill buckets' forward at tp=2, XLA's Triton GEMMs (default) vs cuBLAS only
# (step_programs.PREFILL_COMPILER_OPTIONS), one process each (scripts/exp_xla_options.py).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-tp2-prefill}; mkdir -p $OUT
cd scripts
for s in default no_triton_gemm default no_triton_gemm; do
  timeout 100 python exp_xla_options.py --model-shape llama3-8b -tp 2 --set $s --buckets 512,2048 \
    >> $OUT/tp2-prefill.log 2>&1; echo "rc $?" >> $OUT/tp2-prefill.log
done
grep -h "^jax\|^RESULT\|^rc" $OUT/tp2-prefill.log
