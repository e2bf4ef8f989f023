#!/bin/bash
# Profiles the engine's step on the GPU machine (scripts/profile_step.py) under XLA's CUDA-graph
# settings: the plugin's command-buffer flags, the default, rematerialization off, and each
# command-buffer update mode this XLA accepts. Logs under $OUT (or /tmp/jaxpaged-profile).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-profile}
ARGS=${ARGS:---batch 256 --input-len 512 --steps 6}
cd scripts
so=$(python -c "import jax_plugins.xla_cuda13 as m, os; print(os.path.dirname(m.__file__))")/xla_cuda_plugin.so
echo "== command-buffer flags in $so:"; grep -a -o "xla_gpu_\(command_buffer\|graph\)[a-z_]*" "$so" | sort -u | tr '\n' ' '; echo
modes=""
for m in ALWAYS_UPDATE NEVER_UPDATE CAPTURE_CMD_NEVER_UPDATE SKIP_TEMP SKIP_PROFILED DYNAMIC_ALLOCATE VMM_PERSISTENT_TEMP; do
  if XLA_FLAGS="--xla_gpu_command_buffer_update_mode=$m" python -c "import jax, jax.numpy as j; jax.jit(lambda x: x + 1)(j.ones(3)).block_until_ready()" >/dev/null 2>&1; then modes="$modes $m"; fi
done
echo "== update modes accepted:$modes"
run() { echo; echo "######## XLA_FLAGS=$1"; XLA_FLAGS="$1" python profile_step.py $ARGS --cmdbuf --out /tmp/prof-$RANDOM $2 2>&1 | grep -v "^W1\|rematerial\|^ *$" | tee -a $OUT/profile.log; }
run "" --gil
run "--xla_disable_hlo_passes=rematerialization"
for m in $modes; do case $m in ALWAYS_UPDATE|DYNAMIC_ALLOCATE) ;; *) run "--xla_gpu_command_buffer_update_mode=$m";; esac; done
