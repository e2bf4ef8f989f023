#!/bin/bash
# Session 8's first x2 call (written in session 7): (1) the cold start after the
# short-query compile cut (8B mixed on GPU 0 from an empty compilation cache); (2) does one
# dispatch of K forward iterations (fori_loop) cost the host less than K dispatches, at tp=1
# and tp=2, for a decode bucket of 16 and of 256 rows (scripts/exp_multistep.py)?
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-multistep}; mkdir -p $OUT
cd scripts
CUDA_VISIBLE_DEVICES=0 timeout 150 python benchmark_throughput.py --model-shape llama3-8b --workload mixed \
  --num-kv-blocks 24000 --max-model-len 2048 --no-progress --compilation-cache /tmp/cache-cold \
  --json $OUT/mixed-cold.json > $OUT/mixed-cold.log 2>&1 && echo "== mixed, cold cache" && python run_summary.py $OUT/mixed-cold.json
for tp in 1 2; do
  dev=$([ $tp = 1 ] && echo 0 || echo 0,1)
  for bucket in 16 256; do
    CUDA_VISIBLE_DEVICES=$dev timeout 150 python exp_multistep.py --model-shape llama3-8b -tp $tp --bucket $bucket \
      --k 1,4,8 > $OUT/multistep-tp$tp-b$bucket.log 2>&1
    echo "== multistep tp=$tp bucket $bucket (rc $?)"; grep -v "^W\|^I\|Warn" $OUT/multistep-tp$tp-b$bucket.log | tail -6
  done
done
