#!/bin/bash
# Session 12 (nvidia-h200-x2): the kernel tests on the GPU (f32 cases against TF32 dots, and
# the slow bf16 cases), then the all-reduce kernels inside the step's CUDA graph: psum vs
# exp_allreduce.py's Mosaic GPU one-shot kernel, profiled per call, with XLA's default flags
# and with session 4's `one graph` flags. Logs under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-s12}; mkdir -p $OUT
ONE="--xla_gpu_command_buffer_update_mode=SKIP_TEMP --xla_gpu_enable_command_buffer=+COLLECTIVES --xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false"
echo "######## kernel tests on GPU 0"
CUDA_VISIBLE_DEVICES=0 timeout 400 python -m pytest -q -p no:cacheprovider tests/test_paged_attention_kernel.py \
  2>&1 | tee $OUT/kernel-tests.log | tail -25
cd scripts
for tag in default one; do
  f=""; [ $tag = one ] && f="$ONE"
  echo "######## all-reduce, XLA_FLAGS=$f"
  CUDA_VISIBLE_DEVICES=0,1 XLA_FLAGS="$f" timeout 200 python exp_allreduce.py --rows 16,256,2048 --profile \
    --out /tmp/ar-$tag 2>&1 | grep -v "^W1\|warn" > $OUT/allreduce-$tag.log
  grep "max |pallas\|^== \(pallas\|psum\)\|kernel_mosaic\|Barrier\|ncclDev\|psum_.*fusion\|Memcpy" $OUT/allreduce-$tag.log | head -60
done
