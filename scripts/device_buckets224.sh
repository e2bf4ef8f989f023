#!/bin/bash
# Session 7, nvidia-h200-x2: (1) the Pallas one-shot all-reduce experiment on both GPUs
# (scripts/exp_allreduce.py, bounded: a semaphore wait may hang); (2) 8B mixed on GPU 0 with
# the default token buckets against buckets at 160 and 224 added, each from a cold compilation
# cache (so the start-up is comparable), with the replayed per-bucket device time.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-buckets224}; mkdir -p $OUT
cd scripts
if [ "${ALLREDUCE:-1}" = 1 ]; then
  CUDA_VISIBLE_DEVICES=0,1 timeout -k 10 ${AR_TIMEOUT:-180} python exp_allreduce.py --out /tmp/ar \
    > $OUT/allreduce.log 2>&1; echo "== allreduce rc $?"; tail -n 40 $OUT/allreduce.log | cut -c1-300
fi
common="--model-shape llama3-8b --workload mixed --num-kv-blocks 24000 --max-model-len 2048 --no-progress"
for name in ${RUNS:-default fine}; do
  extra=$([ $name = fine ] && echo "--token-buckets 16,32,64,128,160,192,224,256,512,1024,2048")
  CUDA_VISIBLE_DEVICES=0 python benchmark_throughput.py $common $extra --compilation-cache /tmp/cache-$name \
    --json $OUT/mixed-$name.json > $OUT/mixed-$name.log 2>&1
  echo "== $name: $(grep '^jaxpaged ' $OUT/mixed-$name.log | cut -c1-200) | $(grep -o 'startup [0-9.]* s' $OUT/mixed-$name.log)"
  python - $OUT/mixed-$name.json <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jaxpaged"]
print("  device_s", round(j["device_s"], 3), "busy", round(j["device_busy"], 3), "startup", round(j["startup_s"], 1),
      {k: (v["steps"], round(v["mean_ms"], 2)) for k, v in j["device_by_bucket"].items()})
PY
done
