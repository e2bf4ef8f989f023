#!/usr/bin/env bash
# The server across two processes on the GPU machine (one GPU each, tp=2 over both, NCCL between
# processes): process 1 follows, process 0 serves HTTP; benchmark_serving.py at rate inf against
# it, then SIGINT to process 0 and both exit codes. Needs the server wheels (carry `.whl`).
# Llama-3-8B shape, random weights. Logs in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/jaxpaged-mp}; mkdir -p "$OUT"
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
python scripts/make_shape_model.py /tmp/m8b --model-shape llama3-8b || exit 2
common="--model /tmp/m8b --served-model-name m --load-format dummy -tp 2 --num-processes 2 --coordinator-address 127.0.0.1:12355
  --max-model-len 2048 --num-kv-blocks 12000 --no-enable-prefix-caching --host 127.0.0.1 --port 8000"
CUDA_VISIBLE_DEVICES=1 python -m jaxpaged.serve $common --process-id 1 > "$OUT/p1.log" 2>&1 & P1=$!
CUDA_VISIBLE_DEVICES=0 python -m jaxpaged.serve $common --process-id 0 > "$OUT/p0.log" 2>&1 & P0=$!
start=$SECONDS
until python -c "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8000/health', timeout=2)" 2>/dev/null; do
  if ! kill -0 $P0 2>/dev/null || ! kill -0 $P1 2>/dev/null || (( SECONDS - start > 300 )); then
    echo "start-up failed"; tail -20 "$OUT/p0.log" "$OUT/p1.log"; kill $P0 $P1 2>/dev/null; exit 1
  fi
  sleep 2
done
echo "ready after $((SECONDS - start)) s"
python scripts/benchmark_serving.py --base-url http://127.0.0.1:8000 --num-prompts 200 --request-rates inf \
  --workload mixed --max-duration 120 --json "$OUT/serving-2proc.json" --no-progress 2>&1 | tail -12
kill -INT $P0; wait $P0; c0=$?; wait $P1; c1=$?
echo "exit codes: process 0 $c0, process 1 $c1"
grep -i "error\|Traceback" "$OUT/p0.log" "$OUT/p1.log" | head -5
