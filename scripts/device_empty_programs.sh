#!/bin/bash
# Session 6: attention programs that own no tokens exit before loading their q tile. Fixed and
# mixed (8B shape, replayed device time) with the previous package against this one, on one GPU:
#   mkdir -p .exp/old && git archive 7c506a0 jaxpaged | tar -x -C .exp/old   # then carry .exp
# The kernel-level numbers: scripts/device_kernels_b256.sh.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/jaxpaged-empty}; mkdir -p $OUT
ROOT=$PWD OLD=${OLD:-$PWD/.exp/old}
cd scripts
for wl in fixed mixed; do for v in old new; do
  pp=$([ $v = old ] && echo $OLD || echo $ROOT)
  PYTHONPATH=$pp python benchmark_throughput.py --model-shape llama3-8b --num-kv-blocks 24000 --max-model-len 2048 \
    --no-progress --workload $wl --json $OUT/$wl-$v.json > $OUT/$wl-$v.log 2>&1
  echo "== $wl $v: $(grep '^jaxpaged ' $OUT/$wl-$v.log | cut -c1-200) | $(grep -i 'replay' $OUT/$wl-$v.log | tail -1 | cut -c1-200)"
done; done
