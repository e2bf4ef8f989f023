#!/bin/bash
# Session 7 (nvidia-h200-x2): async scheduling with 2 steps in flight (the default since) against
# 1 (vLLM's one step ahead). 8B shape: mixed on GPU 0 alternating 2/1/2/1, fixed 1/2, then
# mixed at tp=2 on both GPUs 1/2 (no replay), then batch-1/8 latency and TTFT with 2.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-inflight}; mkdir -p $OUT
cd scripts
common="--model-shape llama3-8b --num-kv-blocks 24000 --max-model-len 2048 --no-progress"
run() {  # name, devices, extra args
  local name=$1 dev=$2; shift 2
  CUDA_VISIBLE_DEVICES=$dev timeout 200 python benchmark_throughput.py $common "$@" --json $OUT/$name.json \
    > /tmp/$name.log 2>&1 || { echo "== $name failed"; tail -5 /tmp/$name.log; return; }
  echo "== $name"; python run_summary.py $OUT/$name.json
}
run mixed-d2-a 0 --workload mixed
run mixed-d1-a 0 --workload mixed --max-steps-in-flight 1
run mixed-d2-b 0 --workload mixed
run mixed-d1-b 0 --workload mixed --max-steps-in-flight 1
run fixed-d1 0 --workload fixed --max-steps-in-flight 1
run fixed-d2 0 --workload fixed
run tp2-mixed-d1 0,1 --workload mixed -tp 2 --no-replay --max-steps-in-flight 1
run tp2-mixed-d2 0,1 --workload mixed -tp 2 --no-replay
CUDA_VISIBLE_DEVICES=0 timeout 150 python benchmark_latency.py --model-shape llama3-8b --num-kv-blocks 24000 \
  --max-model-len 2048 --batches 1,8 --prompt-lens 128,512,1024 --json $OUT/latency-d2.json > $OUT/latency-d2.log 2>&1
echo "== latency d2"; tail -n 12 $OUT/latency-d2.log
