#!/usr/bin/env bash
# Online serving benchmark on a random-weight shape: `python -m jaxpaged.serve --load-format dummy`
# in the background, scripts/benchmark_serving.py against it, then the server is stopped.
#
#   bash scripts/device_serving.sh            # from anywhere; results in $OUT (or a temp dir)
#
# On the GPU machine the server's missing packages travel as wheels in .whl/ (carry `.whl`):
# starlette, uvicorn, pydantic, pydantic-core, annotated-types, typing-inspection, anyio, idna,
# h11, click, typing-extensions, sniffio. They are installed into /tmp/site first.
# Environment overrides (defaults in brackets):
#   SHAPE [llama3-8b] (or tiny, llama3-1b, llama3-70b)   RATES [4,16,inf]   NUM_PROMPTS [200]
#   WORKLOAD [mixed]   BENCH_ARGS [""] (more benchmark_serving.py flags, e.g. "--min-len 8 --max-len 64")
#   MAX_MODEL_LEN [2048]   NUM_KV_BLOCKS [24000]   SERVER_ARGS [""] (more server flags)
#   PORT [8000]   STARTUP_TIMEOUT [420] s   MAX_DURATION [180] s per rate   MODEL_DIR [/tmp/jaxpaged-$SHAPE]
#   SKIP_WHEELS [0] (1: use the packages already installed, e.g. on a CPU dev box)   PYTHON [python3]
#   JAX_COMPILATION_CACHE_DIR [/tmp/jaxpaged-xla-cache] (JAX's persistent cache: a restart skips compiles)
# Files written to $OUT: serving.json, serving.png, server.log, bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d /tmp/jaxpaged-serving.XXXXXX)}
SHAPE=${SHAPE:-llama3-8b}
RATES=${RATES:-4,16,inf}
NUM_PROMPTS=${NUM_PROMPTS:-200}
WORKLOAD=${WORKLOAD:-mixed}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-2048}
NUM_KV_BLOCKS=${NUM_KV_BLOCKS:-24000}
PORT=${PORT:-8000}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-420}
MAX_DURATION=${MAX_DURATION:-180}
MODEL_DIR=${MODEL_DIR:-/tmp/jaxpaged-$SHAPE}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxpaged-xla-cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

if [ "${SKIP_WHEELS:-0}" != 1 ]; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/ (carry .whl, or SKIP_WHEELS=1)"; exit 2; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 2; }
    export PYTHONPATH=/tmp/site:.
else
    export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
fi

$PY scripts/make_shape_model.py "$MODEL_DIR" --model-shape "$SHAPE" || exit 2

$PY -m jaxpaged.serve --model "$MODEL_DIR" --served-model-name "$SHAPE-dummy" --load-format dummy \
    --host 127.0.0.1 --port "$PORT" --no-enable-prefix-caching --max-model-len "$MAX_MODEL_LEN" \
    --num-kv-blocks "$NUM_KV_BLOCKS" ${SERVER_ARGS:-} >"$OUT/server.log" 2>&1 &
SERVER_PID=$!
stop_server() {
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID"
        for _ in $(seq 30); do kill -0 "$SERVER_PID" 2>/dev/null || return 0; sleep 1; done
        kill -9 "$SERVER_PID" 2>/dev/null
    fi
}
trap stop_server EXIT

ready() {  # /health answers 200 (no proxy: loopback)
    $PY -c "import sys, urllib.request as u
try:
    sys.exit(u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:$PORT/health', timeout=2).status != 200)
except Exception:
    sys.exit(1)"
}
start=$SECONDS
until ready; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "the server exited during start-up; its log ends:"; tail -n 40 "$OUT/server.log"; exit 1
    fi
    if (( SECONDS - start > STARTUP_TIMEOUT )); then
        echo "the server did not answer /health within ${STARTUP_TIMEOUT} s; its log ends:"
        tail -n 40 "$OUT/server.log"; exit 1
    fi
    sleep 2
done
echo "server ready after $((SECONDS - start)) s:"
grep -E "jaxpaged(\.serve)?: " "$OUT/server.log" | tail -n 6

$PY scripts/benchmark_serving.py --base-url "http://127.0.0.1:$PORT" --request-rates "$RATES" \
    --workload "$WORKLOAD" --num-prompts "$NUM_PROMPTS" --max-duration "$MAX_DURATION" --no-progress \
    --json "$OUT/serving.json" --plot "$OUT/serving.png" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "the server died during the benchmark; its log ends:"; tail -n 40 "$OUT/server.log"; rc=1
fi
echo "results in $OUT (rc $rc)"
exit "$rc"
