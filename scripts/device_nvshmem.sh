#!/bin/bash
# XLA's NVSHMEM backend for small all-reduces (--xla_gpu_experimental_enable_nvshmem) against
# NCCL inside the step's CUDA graph (session 4's `one graph` flags), on the 4-GPU machine:
#   1. psum alone, tp=2 and tp=4, per call in a chain: default flags, `one graph`, `one graph` + NVSHMEM
#   2. 8B tp=2 latency: `one graph` (GPUs 0,1) beside `one graph` + NVSHMEM (GPUs 2,3), then swapped
#   3. 70B tp=4 batch-1/8 latency with `one graph` + NVSHMEM (session 10 without it: 13.52 ms)
# NVLink multicast stays off (the machine's NVSHMEM_DISABLE_NVLS=1, NCCL_NVLS_ENABLE=0 are kept).
# Session 12's run stopped after 1: jax 0.11.2's CUDA plugin rejects the NVSHMEM flag
# (docs/results/x4-psum-nvshmem-session12.log); 2 and 3 run only where it is accepted.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-nvshmem}; mkdir -p $OUT
quiet() { grep -v "^W1\|rematerial\|Warning\|warn(\|^ *$"; }
ONE="--xla_gpu_command_buffer_update_mode=SKIP_TEMP --xla_gpu_enable_command_buffer=+COLLECTIVES --xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false"
SHM="$ONE --xla_gpu_experimental_enable_nvshmem=true"
echo "env: NVSHMEM_DISABLE_NVLS=$NVSHMEM_DISABLE_NVLS NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"
cd scripts
for devs in 0,1 0,1,2,3; do
  for tag in default one shm; do
    case $tag in default) f="";; one) f="$ONE";; shm) f="$SHM";; esac
    echo "######## psum on GPUs $devs, $tag"
    CUDA_VISIBLE_DEVICES=$devs XLA_FLAGS="$f" timeout 120 python exp_allreduce.py --psum-only --rows 1,16,256,2048 \
      2>&1 | quiet | tail -5
  done
done 2>&1 | tee $OUT/psum.log
grep -q "NVSHMEM mentions in the compiled chain: [1-9]" $OUT/psum.log || { echo "NVSHMEM not used: stop"; exit 0; }
lat8b() {  # devices, flags, tag
  CUDA_VISIBLE_DEVICES=$1 XLA_FLAGS="$2" timeout 200 python benchmark_latency.py --model-shape llama3-8b -tp 2 \
    --max-model-len 2048 --batches 1,8,16 --prompt-lens 512 --num-kv-blocks 24000 --json /tmp/$3.json > $OUT/$3.log 2>&1
}
lat8b 0,1 "$ONE" 8b-lat-one-a & lat8b 2,3 "$SHM" 8b-lat-shm-a & wait
lat8b 0,1 "$SHM" 8b-lat-shm-b & lat8b 2,3 "$ONE" 8b-lat-one-b & wait
for t in 8b-lat-one-a 8b-lat-shm-a 8b-lat-shm-b 8b-lat-one-b; do echo "######## $t"; quiet < $OUT/$t.log | tail -6; done
echo "######## 70B tp=4 latency, one graph + NVSHMEM"
XLA_FLAGS="$SHM" timeout 240 python benchmark_latency.py --model-shape llama3-70b -tp 4 --max-model-len 2048 \
  --max-num-seqs 256 --num-kv-blocks 40000 --batches 1,8 --prompt-lens 512 --json $OUT/70b-lat-shm.json \
  2>&1 | quiet | tail -8
