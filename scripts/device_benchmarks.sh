#!/bin/bash
# The benchmark set of docs/benchmarks.md on the GPU machine, in one lease: the GPU kernel tests,
# Llama-3-8B-shape mixed and fixed throughput and latency on GPU 0, and, on a machine with two
# GPUs, mixed throughput at tp=2 with XLA's SKIP_TEMP command-buffer update mode (docs/parallel.md).
# JSON results and logs under $OUT (or /tmp/jaxpaged-bench).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-bench}; mkdir -p $OUT
quiet() { grep -v "^W1\|rematerial\|Warning\|warn("; }
python -m pytest -q -p no:cacheprovider tests/test_paged_attention_kernel.py -k gpu 2>&1 | tail -2
cd scripts
common="--model-shape llama3-8b --num-kv-blocks 24000 --max-model-len 2048"
for w in mixed fixed; do
  CUDA_VISIBLE_DEVICES=0 python benchmark_throughput.py $common --workload $w --no-progress --json $OUT/h200-8b-$w.json \
    2>&1 | quiet | tee $OUT/$w.log | tail -9
done
CUDA_VISIBLE_DEVICES=0 python benchmark_latency.py --model-shape llama3-8b --max-model-len 2048 --max-num-seqs 256 \
  --num-kv-blocks 24000 --prompt-lens 128,512,1024 --json $OUT/h200-8b-latency.json 2>&1 | quiet | tee $OUT/latency.log | tail -9
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  CUDA_VISIBLE_DEVICES=0,1 XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP python benchmark_throughput.py $common \
    --workload mixed -tp 2 --no-progress --json $OUT/x2-8b-mixed-tp2.json 2>&1 | quiet | tee $OUT/tp2.log | tail -9
fi
