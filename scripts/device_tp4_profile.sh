#!/bin/bash
# Why a 70B tp=4 decode step takes ~14 ms of host dispatch (session 4): profiles of batch-1 steps
# (scripts/profile_step.py: host events, CUDA-graph segments, the ops outside command buffers)
# with collectives in command buffers, with XLA's one-shot all-reduce kernel on (default) and
# off (NCCL for every all-reduce); then mixed throughput under SKIP_TEMP with the KV pool
# sized from memory (the CUDA driver's numbers). Logs and JSON in $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-tp4}; mkdir -p $OUT
quiet() { grep -v "^W1\|rematerial\|Warning\|warn(\|^ *$"; }
skip=--xla_gpu_command_buffer_update_mode=SKIP_TEMP
coll="$skip --xla_gpu_enable_command_buffer=+COLLECTIVES"
cd scripts
for flags in "$coll" "$coll --xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false"; do
  echo "######## 70B tp=4 batch-1 profile, XLA_FLAGS=$flags"
  XLA_FLAGS="$flags" timeout 170 python profile_step.py --model-shape llama3-70b -tp 4 --batch 1 --input-len 512 \
    --steps 8 --num-kv-blocks 40000 --cmdbuf --hlo --out /tmp/prof-$RANDOM 2>&1 | quiet | tee -a $OUT/profile.log | tail -60
done
[ "${MIXED:-1}" = 0 ] && exit 0
echo "######## 70B tp=4 mixed, XLA_FLAGS=$skip, KV pool from memory"
XLA_FLAGS="$skip" timeout 220 python benchmark_throughput.py --model-shape llama3-70b -tp 4 --max-model-len 2048 \
  --workload mixed --no-replay --no-progress --json $OUT/x4-70b-mixed-skip.json 2>&1 | quiet | tee $OUT/mixed.log | tail -9
