#!/bin/bash
# Split-KV for small decode batches (session 4): GPU kernel tests, the kernel at batch 1 in the
# engine's 16-sequence bucket (2 and 8 KV heads per GPU, tables of 2048 keys) with the split
# sweep, 8B batch-1/8 latency on one GPU (in parallel), then 70B tp=4 latency (whole step in one
# CUDA graph per GPU: SKIP_TEMP + collectives in command buffers + one-shot all-reduce off).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-split}; mkdir -p $OUT
quiet() { grep -v "^W1\|rematerial\|Warning\|warn(\|^ *$"; }
COLL="--xla_gpu_command_buffer_update_mode=SKIP_TEMP --xla_gpu_enable_command_buffer=+COLLECTIVES --xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false"
CUDA_VISIBLE_DEVICES=0 python -m pytest -q -p no:cacheprovider tests/test_paged_attention_kernel.py -k gpu > $OUT/tests.log 2>&1 &
(cd scripts; for h in 2 8; do CUDA_VISIBLE_DEVICES=1 python bench_kernels.py --only decode --decode-batch 1 --decode-bucket 16 \
  --decode-ctx 512,2048 --decode-kv-heads $h --decode-table 2048 --sweep; done > $OUT/kernels.log 2>&1) &
(cd scripts; CUDA_VISIBLE_DEVICES=2 python benchmark_latency.py --model-shape llama3-8b --max-model-len 2048 --max-num-seqs 256 \
  --num-kv-blocks 24000 --prompt-lens 128,512,1024 --json $OUT/h200-8b-latency.json > $OUT/latency-8b.log 2>&1) &
wait
tail -2 $OUT/tests.log; grep "^|" $OUT/kernels.log | grep -v "reference\|jax pallas"; quiet < $OUT/latency-8b.log | tail -10
cd scripts
echo "######## 70B tp=4 latency, XLA_FLAGS=$COLL"
XLA_FLAGS="$COLL" timeout 170 python benchmark_latency.py --model-shape llama3-70b -tp 4 --max-model-len 2048 \
  --max-num-seqs 256 --num-kv-blocks 40000 --batches 1,8 --prompt-lens 512 --json $OUT/x4-70b-latency-split.json \
  2>&1 | quiet | tail -7
