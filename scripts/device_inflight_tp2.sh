#!/bin/bash
# Session 7, second x2 lease: (1) is the Pallas all-reduce kernel captured into XLA's command
# buffers? exp_allreduce with command buffers for segments of any size (min graph size 1);
# (2) 8B mixed with 2 steps in flight: tp=1 and tp=2 under SKIP_TEMP (session 3's best tp=2
# setting), then tp=1 with XLA's defaults twice (the headline).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-inflight-tp2}; mkdir -p $OUT
cd scripts
CUDA_VISIBLE_DEVICES=0,1 XLA_FLAGS="--xla_gpu_graph_min_graph_size=1" timeout -k 10 120 python exp_allreduce.py \
  --rows 16,256 --out /tmp/ar > $OUT/allreduce-graph1.log 2>&1; echo "== allreduce (min graph size 1) rc $?"
grep -v "^W\|^I" $OUT/allreduce-graph1.log | tail -n 16 | cut -c1-300
common="--model-shape llama3-8b --num-kv-blocks 24000 --max-model-len 2048 --no-progress --workload mixed"
run() {  # name, devices, XLA_FLAGS, extra args
  local name=$1 dev=$2 flags=$3; shift 3
  CUDA_VISIBLE_DEVICES=$dev XLA_FLAGS="$flags" timeout 150 python benchmark_throughput.py $common "$@" \
    --json $OUT/$name.json > /tmp/$name.log 2>&1 || { echo "== $name failed"; tail -5 /tmp/$name.log; return; }
  echo "== $name"; python run_summary.py $OUT/$name.json
}
skip="--xla_gpu_command_buffer_update_mode=SKIP_TEMP"
run tp2-skip-d2 0,1 "$skip" -tp 2 --no-replay
run tp1-skip-d2 0 "$skip"
run tp1-d2-a 0 ""
run tp1-d2-b 0 ""
