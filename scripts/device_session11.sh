#!/bin/bash
# Session 11, first lease: the fused gate/up + SwiGLU kernel against XLA's MLP (exp_swiglu.py
# sweep), then the decode step's whole kernel list and optimized HLO at 256 and 16 rows
# (profile_step.py), to see which per-layer kernels a fusion could remove.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/s11}; mkdir -p $OUT
nvidia-smi --query-gpu=name,clocks.sm,power.draw,power.limit --format=csv | tee $OUT/s11.log
timeout 240 python scripts/exp_swiglu.py --sweep 2>&1 | grep -v "^W1\|Triton.*deprecated" | tee -a $OUT/s11.log
cd scripts
for b in 256 16; do
  timeout 200 python profile_step.py --batch $b --input-len 512 --steps 6 --top 45 --hlo --out /tmp/prof-$b 2>&1 \
    | grep -v "^W1\|rematerial\|^ *$\|deprecated" | tee -a $OUT/s11.log
  cp /tmp/prof-$b/forward_after_optimizations.txt $OUT/hlo-b$b.txt
done
