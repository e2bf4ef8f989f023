#!/bin/bash
# Mixed-workload throughput (Llama-3-8B shape) at each tensor-parallel size in $TPS, with XLA's
# default command-buffer update mode and with $FLAGS, side by side in one lease. JSON results
# and logs under $OUT (or /tmp/jaxpaged-flags).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/jaxpaged-flags}; mkdir -p $OUT
TPS=${TPS:-1 2}
FLAGS=${FLAGS:---xla_gpu_command_buffer_update_mode=SKIP_TEMP}
WORKLOAD=${WORKLOAD:-mixed}
cd scripts
for tp in $TPS; do
  devs=$(seq -s, 0 $((tp - 1)))
  for flags in "" "$FLAGS"; do
    tag=tp$tp${flags:+-flags}
    echo "######## tp=$tp XLA_FLAGS=$flags"
    CUDA_VISIBLE_DEVICES=$devs XLA_FLAGS="$flags" python benchmark_throughput.py --model-shape llama3-8b \
      --workload $WORKLOAD --num-kv-blocks 24000 --max-model-len 2048 -tp $tp --no-progress \
      --json $OUT/$tag.json 2>&1 | grep -v "^W1\|rematerial" | tee $OUT/$tag.log | tail -12
  done
done
