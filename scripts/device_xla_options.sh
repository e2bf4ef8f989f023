#!/bin/bash
# Session 9: XLA compile options per forward program (scripts/exp_xla_options.py), 8B shape,
# tp=1, one process per option set, two lanes at once (GPU 0 and GPU 1 of the x2 machine,
# each with its own `default` baseline); then a table of every RESULT line.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-xla-options}; mkdir -p $OUT
cd scripts
lane() {  # gpu, sets...
  local gpu=$1; shift
  for s in "$@"; do
    CUDA_VISIBLE_DEVICES=$gpu timeout 240 python exp_xla_options.py --model-shape llama3-8b --set $s ${EXTRA:-} \
      >> $OUT/lane$gpu.log 2>&1
    echo "lane $gpu set $s rc $?" >> $OUT/lane$gpu.log
  done
}
lane 0 ${LANE0:-default autotune2 triton_any exhaustive} &
lane 1 ${LANE1:-default autotune0 warp_spec all_triton no_triton_gemm} &
wait
for g in 0 1; do echo "== GPU $g"; grep -h "^RESULT\|^lane\|^jax" $OUT/lane$g.log; done
