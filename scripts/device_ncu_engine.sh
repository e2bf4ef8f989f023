#!/bin/bash
# Session 7: the per-sequence decode kernel profiled inside the engine (fixed workload, a
# 256-row decode step at context ~600), to compare with the kernel bench's ncu report
# (docs/results/h200-ncu-decode-b256-seq-session6.txt): duration, clocks, DRAM and L2 throughput.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} CUDA_VISIBLE_DEVICES=0
OUT=${OUT:-/tmp/jaxpaged-ncu}; mkdir -p $OUT
cd scripts
timeout 330 ncu --clock-control none -k regex:paged_attention_seq --launch-skip ${SKIP:-2000} --launch-count 1 \
  --set full python benchmark_throughput.py --model-shape llama3-8b --workload fixed --num-kv-blocks 24000 \
  --max-model-len 2048 --no-progress --no-replay > $OUT/ncu-engine-decode.txt 2>&1
echo "rc $?"
grep -E "paged_attention_seq|Frequency|Duration|DRAM Throughput|L2 Cache Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Block Limit Registers|jaxpaged " $OUT/ncu-engine-decode.txt | head -30
