# Sourced by the device scripts: `bench NAME GPUS ARGS...` runs benchmark_throughput.py on the
# Llama-3-8B shape (max_model_len 2048, compilation cache /tmp/cache-s10) on CUDA devices GPUS,
# writes $OUT/NAME.json, and appends its summary lines to $OUT/all.log. Run from scripts/.
bench() {
  local name=$1 gpus=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpus timeout ${BENCH_TIMEOUT:-170} python benchmark_throughput.py --model-shape llama3-8b \
    --max-model-len 2048 --no-progress --compilation-cache /tmp/cache-s10 --json $OUT/$name.json "$@" \
    > /tmp/$name.log 2>&1
  echo "== $name: GPUs $gpus $* (rc $?)" | tee -a $OUT/all.log
  grep -A1 "^engine" /tmp/$name.log | tail -1 | tee -a $OUT/all.log
  grep "ceilings\|device busy\|^start-up {\|start-up programs\|by token bucket\|host ms per step\|steps, " \
    /tmp/$name.log >> $OUT/all.log
  grep -i "error\|Traceback" /tmp/$name.log | head -5 >> $OUT/all.log
}
