#!/bin/bash
# Session 7, closing run on the one-GPU kind (nvidia-h200): the session's defaults (two steps
# in flight), 8B mixed twice (the first from a cold compilation cache: the cold start) and fixed.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-h200-s7}; mkdir -p $OUT
cd scripts
for name in mixed-a mixed-b fixed; do
  timeout 150 python benchmark_throughput.py --model-shape llama3-8b --workload ${name%-*} --num-kv-blocks 24000 \
    --max-model-len 2048 --no-progress --json $OUT/$name.json > /tmp/$name.log 2>&1 \
    || { echo "== $name failed"; tail -5 /tmp/$name.log; continue; }
  echo "== $name"; python run_summary.py $OUT/$name.json
done
