#!/usr/bin/env bash
# Reproduces the numbers of docs/benchmarks.md on one H200 (the lent `nvidia-h200` machine) and
# prints a short table last. Runs from the repository (PYTHONPATH=., no install needed).
#
#   bash scripts/run_h200_suite.sh [OUT_DIR]     # results in $OUT if set, else OUT_DIR, else /tmp/jaxpaged-suite
#
# Parts, in this order ($PARTS, default "fixed latency mixed kernels serving"; ~7-8 min on one H200,
# the first engine's start-up is the cold start: it compiles into an empty compilation cache):
#   fixed    fixed workload, jaxpaged against HF transformers `generate` in one run (--compare hf)  ~130 s
#   latency  batch-1 / batch-8 decode inter-token latency and TTFT of 128 / 512-token prompts    ~40 s
#   mixed    mixed workload                                                                        ~70 s
#   kernels  paged-attention kernel: GPU checks and the default table (decode batch 64, prefill,
#            mixed), then decode at batch 256 on an engine-sized pool and the 2048-token bucket  ~3 min
#   serving  `python -m jaxpaged.serve` on the shape + scripts/benchmark_serving.py at 4, 16, inf req/s
#            (~2.5 min). Needs starlette, uvicorn, pydantic, httpx and aiohttp: installed from the wheels in .whl/
#            when that folder exists, else skipped with a message where they are not importable.
#   longctx  (name it in PARTS) scripts/benchmark_long_context.py: TTFT and ITL at 8k / 32k / 128k contexts,
#            batch 1 and 8, against the weights + KV floor; RAG 128 x 16k prompts with and without a
#            shared 8k prefix (~6 min; LONGCTX_ARGS="--parts latency" or "--parts rag" runs half)
#   quant    (name it in PARTS) fixed and mixed: bf16, then fp8 W8A8 + fp8 KV cache, side by side    ~6 min
#   quantlat (name it in PARTS) batch-1 / batch-8 ITL and TTFT: bf16, fp8 W8A8 + fp8 KV, int4 W4A16 ~3 min
#   spec     (name it in PARTS) batch-1 ITL without and with synthetic speculation (k = 4, 80%, at any
#            batch size: LATENCY_ARGS="--batches 1,16,32,64" measures the crossover)   ~1.5 min
#   specfixed (name it in PARTS) the fixed workload (256 rows) without and with n-gram speculation ~3.5 min
#   structured (name it in PARTS) scripts/benchmark_structured.py: batch-64 TPOT with every row under a
#            JSON schema against unconstrained, then 16 profiled steps of the greedy and JSON-objects runs
#            ($OUT/structured-trace, device timelines in the log); BPE_MODEL: its model folder (default
#            .cache/llama3-8b-bpe, carried; made there in ~2 min when missing)                   ~3.5 min
#   gemm     (name it in PARTS) scripts/bench_gemm.py: each quantized linear() against bf16 at 1-2048 tokens,
#            the device's kernel time per layer (a profile), the HLO's GEMM calls (fp8: cuBLASLt's fp8 GEMM),
#            the int4 kernel against dequantize-then-GEMM (and on act-order weights); GEMM_KINDS / GEMM_TOKENS pick them (e.g. the
#            Mosaic GPU kernel: "fp8 fp8_mgpu fp8_mgpu:block_n=128 int4 int4_mgpu int4_mgpu_tile"), one process each ~3 min
#   rows     (name it in PARTS) fp8 W8A8's row kernels: tests/test_fp8_quant.py compiled, then
#            scripts/bench_row_kernels.py --sweep (against AB_TREE's kernels where set)            ~2 min
#   mosaic   (name it in PARTS) the Mosaic GPU kernels (paged prefill, weight-streaming matmul): their GPU
#            tests, a process per file (per test after a crash: a CUDA fault poisons its process), then
#            bench_kernels.py --only prefill,chunk (8 x 2048 causal, a 32k prompt's chunks)        ~4 min
#   mosaicttft (name it in PARTS) TTFT of 2k / 8k / 32k prompts and batch-1 ITL through the engine:
#            attention_backend auto (Pallas) then mosaic (the Mosaic GPU prefill route), side by side  ~4 min
#   splitkv  (name it in PARTS) scripts/bench_kernels.py --only loop: decode at batch 1, 4 and 8, contexts
#            8k / 32k / 128k in a 16-row bucket, timed on the device (kernel calls chained in one jit),
#            the default against split-KV targets and tiles; batches 64 and 256 at 1k / 4k (no split-KV);
#            AB_TREE set: its kernel's default too                                                    ~4 min
#   tp2      (2 GPUs, name it in PARTS) mixed at tp=1 and tp=2, 8192-token budget, multi-step decode K=8
#   tp4      (4 GPUs, name it in PARTS) Llama-3-70B shape at tp=4: latency, then mixed (K=8, budget 8192)
#   ab       (name it in PARTS) this tree against another revision's package, side by side: mixed (each
#            version's first run into an empty compilation cache: its cold start), fixed and latency, the
#            versions alternating, $ROUNDS rounds (default 1, ~6 min). AB_TREE: a folder holding the other
#            revision's jaxpaged/, e.g. `git archive REV jaxpaged | tar -x -C .ab/old` (carried to the GPU
#            machine: it travels only if named in carry). Prints the comparison table last. AB_RUNS picks
#            the runs (default "mixed fixed latency"; also "structured": benchmark_structured.py, and
#            "gemm": bench_gemm.py's bf16 / int4 / int4_dequant / fp8 rows, ~1.5 min each per version)
# Workloads and settings: docs/benchmarks.md, "Method". Every command's full log is $OUT/<part>*.log,
# its JSON $OUT/<part>*.json. Extra flags (e.g. for a quick CPU check with MODEL=a small model
# directory): THROUGHPUT_ARGS, LATENCY_ARGS, LONGCTX_ARGS, SERVER_ARGS, SERVING_ARGS; CACHE: the compilation cache.
set -uo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0;; esac
cd "$(dirname "$0")/.."
OUT=${OUT:-${1:-/tmp/jaxpaged-suite}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PARTS=${PARTS:-fixed latency mixed kernels serving}
CACHE=${CACHE:-$(mktemp -d /tmp/jaxpaged-suite-xla.XXXXXX)}  # empty: the first start-up is a cold start
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ -n "${MODEL:-}" ]; then SRC=(--model "$MODEL"); else SRC=(--model-shape llama3-8b); fi
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
echo "jaxpaged $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u '+%Y-%m-%d %H:%M UTC'), " \
     "$NGPU GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sort | uniq -c | xargs)"
echo "results in $OUT; parts: $PARTS"
SUITE_START=$SECONDS
TIMES=()

want() { [[ " $PARTS " == *" $1 "* ]]; }
# run NAME TIMEOUT CMD...: the command's output to $OUT/NAME.log, its lines that carry results to the terminal
run() {
    local name=$1 limit=$2 start=$SECONDS; shift 2
    echo "== $name: $*"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    grep -E "^(engine |jaxpaged|HF generate|ceilings|device busy|decode ITL|  its device time|  its forwards|TTFT|ITL,|RAG|speedup|speculative|unconstrained|logprobs=1|JSON schema|JSON objects|bitmask fill|bounded|checks|copy bandwidth)|skipp(ing|ed)" \
        "$OUT/$name.log" | cut -c1-200
    [ $rc = 0 ] || { echo "   $name failed (rc $rc; 124: over its ${limit} s), its log ends:"; tail -n 5 "$OUT/$name.log"; }
    TIMES+=("$name $((SECONDS - start)) s")
    return $rc
}
throughput() {  # NAME TIMEOUT ARGS...
    local name=$1 limit=$2; shift 2
    run "$name" "$limit" $PY scripts/benchmark_throughput.py "${SRC[@]}" --no-progress --compilation-cache "$CACHE" \
        --json "$OUT/$name.json" "$@" ${THROUGHPUT_ARGS:-}
}

if want fixed; then
    throughput fixed-vs-hf 300 --workload fixed --compare hf
fi
if want latency; then
    run latency 200 $PY scripts/benchmark_latency.py "${SRC[@]}" --max-model-len 2048 --prompt-lens 128,512 \
        --batches 1,8 --compilation-cache "$CACHE" --json "$OUT/latency.json" ${LATENCY_ARGS:-}
fi
if want mixed; then
    throughput mixed 240 --workload mixed
fi
if want gemm; then  # one process per kind: a kernel's CUDA fault poisons its process's context
    for k in ${GEMM_KINDS:-bf16 fp8 fp8_w8a16 int8 int8_w8a8 int4 int4_actorder int4_dequant}; do
        run "gemm-${k//:/_}" 150 $PY scripts/bench_gemm.py --kinds "$k" --tokens "${GEMM_TOKENS:-1,8,64,256,2048}" \
            --device-time "$OUT/gemm-profiles"
    done
fi
if want rows; then  # fp8 row kernels: their GPU tests, then their timings (against AB_TREE's where set)
    timeout -k 10 120 $PY -m pytest -q --tb=line -p no:cacheprovider tests/test_fp8_quant.py > "$OUT/rows-pytest.log" 2>&1
    echo "rows: $(tail -1 "$OUT/rows-pytest.log")"
    run rows 300 $PY scripts/bench_row_kernels.py --sweep ${AB_TREE:+--ab-tree "$AB_TREE"}
    sed -n '/^case /,$p' "$OUT/rows.log"  # the table, fastest first per case
fi
if want mosaic; then
    for f in tests/test_paged_prefill_mgpu.py tests/test_w8a16_matmul.py; do
        name=mosaic-$(basename "$f" .py)
        timeout -k 10 300 $PY -m pytest -q --tb=line -p no:cacheprovider -m gpu "$f" > "$OUT/$name.log" 2>&1
        rc=$?
        if [ $rc -gt 1 ] && [ $rc != 5 ]; then  # a crash, not failed tests: each test in its own process
            echo "   $f: rc $rc, each test alone:"
            for t in $($PY -m pytest -q --collect-only -p no:cacheprovider -m gpu "$f" 2>/dev/null | grep "::"); do
                timeout -k 10 120 $PY -m pytest -q --tb=line -p no:cacheprovider "$t" >> "$OUT/$name.log" 2>&1 \
                    && echo "   passed $t" || echo "   FAILED $t"
            done
        fi
        grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)|Error:" "$OUT/$name.log" | cut -c1-240 | head -20
    done
    run mosaic-prefill 300 $PY scripts/bench_kernels.py --only prefill,chunk --log "$OUT/mosaic-prefill-table.log"
fi
if want mosaicttft; then
    for b in auto mosaic; do
        run "mosaicttft-$b" 240 $PY scripts/benchmark_latency.py "${SRC[@]}" --max-model-len 33000 \
            --prompt-lens 2048,8192,32000 --batches 1 --decode-steps 16 --attention-backend "$b" \
            --compilation-cache "$CACHE" --json "$OUT/mosaicttft-$b.json"
    done
fi
if want splitkv; then
    run splitkv 200 $PY scripts/bench_kernels.py --only loop --loop-batch 1,4,8 --sweep --log "$OUT/splitkv-table.log"
    big="--only loop --loop-batch 64,256 --loop-ctx 1024,4096 --loop-bucket 64"  # no split-KV: no loss there
    run splitkv-big 120 $PY scripts/bench_kernels.py $big --log "$OUT/splitkv-big-table.log"
    if [ -n "${AB_TREE:-}" ] && [ -d "${AB_TREE:-}/jaxpaged" ]; then
        ab_path=$(cd "$AB_TREE" && pwd)${PYTHONPATH:+:$PYTHONPATH}
        run splitkv-base 150 env PYTHONPATH=$ab_path $PY \
            scripts/bench_kernels.py --only loop --loop-batch 1,4,8 --log "$OUT/splitkv-base-table.log"
        run splitkv-big-base 120 env PYTHONPATH=$ab_path $PY scripts/bench_kernels.py $big \
            --log "$OUT/splitkv-big-base-table.log"
    fi
fi
if want kernels; then
    run kernels 240 $PY scripts/bench_kernels.py --log "$OUT/kernels-table.log"
    run kernels-b256 240 $PY scripts/bench_kernels.py --only decode,bucket --decode-batch 256 --decode-ctx 512,mixed \
        --decode-layers 32 --log "$OUT/kernels-b256-table.log"
fi
if want serving; then
    SITE=""
    if ls .whl/*.whl > /dev/null 2>&1; then
        SITE=$(mktemp -d /tmp/jaxpaged-suite-site.XXXXXX)
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
            || echo "   installing the wheels in .whl/ failed"
    fi
    if ! PYTHONPATH=$SITE:$PYTHONPATH $PY -c "import starlette, uvicorn, pydantic, httpx, aiohttp" 2> /dev/null; then
        echo "== serving: skipped: starlette, uvicorn, pydantic, httpx or aiohttp is not importable (put their wheels in .whl/," \
             "see docs/server.md)"
    else
        start=$SECONDS
        PORT=${PORT:-8000}
        MODEL_DIR=${MODEL:-$OUT/llama3-8b-shape}
        [ -n "${MODEL:-}" ] || $PY scripts/make_shape_model.py "$MODEL_DIR" --model-shape llama3-8b > /dev/null
        [ -n "${MODEL:-}" ] && LOAD=() || LOAD=(--load-format dummy)
        echo "== serving: python -m jaxpaged.serve --model $MODEL_DIR ${LOAD[*]} on port $PORT, then benchmark_serving.py"
        JAX_COMPILATION_CACHE_DIR=$CACHE PYTHONPATH=$SITE:$PYTHONPATH $PY -m jaxpaged.serve --model "$MODEL_DIR" \
            "${LOAD[@]}" --host 127.0.0.1 --port "$PORT" --no-enable-prefix-caching --max-model-len 2048 \
            --num-kv-blocks 24000 ${SERVER_ARGS:-} > "$OUT/serving-server.log" 2>&1 &
        SERVER=$!
        ready=0
        for _ in $(seq 150); do
            kill -0 $SERVER 2> /dev/null || break
            if $PY -c "import sys, urllib.request as u
try:
    sys.exit(u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:$PORT/health', timeout=2).status != 200)
except Exception:
    sys.exit(1)" 2> /dev/null; then ready=1; break; fi
            sleep 2
        done
        if [ $ready = 1 ]; then
            echo "   server ready after $((SECONDS - start)) s"
            PYTHONPATH=$SITE:$PYTHONPATH timeout -k 10 300 $PY scripts/benchmark_serving.py \
                --base-url "http://127.0.0.1:$PORT" --request-rates 4,16,inf --workload mixed --num-prompts 256 \
                --max-duration 90 --no-progress --json "$OUT/serving.json" --plot "$OUT/serving.png" \
                ${SERVING_ARGS:-} > "$OUT/serving.log" 2>&1 || { echo "   serving failed:"; tail -n 5 "$OUT/serving.log"; }
        else
            echo "   the server did not become ready; its log ends:"; tail -n 5 "$OUT/serving-server.log"
        fi
        kill $SERVER 2> /dev/null; wait $SERVER 2> /dev/null
        TIMES+=("serving $((SECONDS - start)) s")
    fi
fi
if want longctx; then
    run longctx 570 $PY scripts/benchmark_long_context.py "${SRC[@]}" --compilation-cache "$CACHE" \
        --json "$OUT/longctx.json" ${LONGCTX_ARGS:-}
fi
if want quant; then
    for q in bf16 fp8; do
        QA=(); [ $q = fp8 ] && QA=(-q fp8 --kv-cache-dtype fp8)
        throughput quant-fixed-$q 300 --workload fixed "${QA[@]}"
        throughput quant-mixed-$q 300 --workload mixed "${QA[@]}"
    done
fi
if want quantlat; then
    for q in bf16 fp8 int4; do
        QA=(); [ $q = fp8 ] && QA=(-q fp8 --kv-cache-dtype fp8); [ $q = int4 ] && QA=(-q int4)
        run quantlat-$q 200 $PY scripts/benchmark_latency.py "${SRC[@]}" --max-model-len 2048 --prompt-lens 512 \
            --batches 1,8 --compilation-cache "$CACHE" --json "$OUT/quantlat-$q.json" "${QA[@]}" ${LATENCY_ARGS:-}
    done
fi
if want spec; then
    # speculation at any batch (LATENCY_ARGS="--batches 1,16,32,64" measures the crossover)
    SYNTH='{"method": "ngram", "num_speculative_tokens": 4, "synthetic_acceptance_rate": 0.8, "disable_by_batch_size": null}'
    for v in off synthetic; do
        SA=(); [ $v = synthetic ] && SA=(--speculative-config "$SYNTH")
        run spec-latency-$v 300 $PY scripts/benchmark_latency.py "${SRC[@]}" --max-model-len 2048 --prompt-lens 128 \
            --batches 1 --compilation-cache "$CACHE" --json "$OUT/spec-latency-$v.json" "${SA[@]}" ${LATENCY_ARGS:-}
    done
fi
if want specfixed; then
    throughput spec-fixed-off 300 --workload fixed
    throughput spec-fixed-ngram 300 --workload fixed --speculative-config '{"method": "ngram", "num_speculative_tokens": 4}'
fi
if want structured; then
    run structured 500 $PY scripts/benchmark_structured.py --model-dir "${BPE_MODEL:-.cache/llama3-8b-bpe}" \
        --compilation-cache "$CACHE" --json "$OUT/structured.json" --trace "$OUT/structured-trace"
fi
if want tp2; then  # the x2 machine
    TP=(--workload mixed --num-kv-blocks 24000 --max-num-batched-tokens 8192 --num-scheduler-steps 8)
    CUDA_VISIBLE_DEVICES=0 throughput tp1-mixed-8192-k8 300 "${TP[@]}"
    CUDA_VISIBLE_DEVICES=0,1 throughput tp2-mixed-8192-k8 300 "${TP[@]}" -tp 2
fi
if want tp4; then  # the x4 machine; XLA flags: the whole step in one CUDA graph per GPU (docs/parallel.md)
    export XLA_FLAGS="--xla_gpu_command_buffer_update_mode=SKIP_TEMP --xla_gpu_enable_command_buffer=+COLLECTIVES \
--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=false"
    run tp4-70b-latency 400 $PY scripts/benchmark_latency.py --model-shape llama3-70b -tp 4 --max-model-len 2048 \
        --max-num-seqs 256 --num-kv-blocks 40000 --batches 1,8 --prompt-lens 512 --compilation-cache "$CACHE" \
        --json "$OUT/tp4-70b-latency.json"
    run tp4-70b-mixed 400 $PY scripts/benchmark_throughput.py --model-shape llama3-70b -tp 4 --workload mixed \
        --max-num-batched-tokens 8192 --num-scheduler-steps 8 --no-replay --no-progress --compilation-cache "$CACHE" \
        --json "$OUT/tp4-70b-mixed.json"
    unset XLA_FLAGS
fi
if want ab; then
    if [ -z "${AB_TREE:-}" ] || [ ! -d "${AB_TREE:-}/jaxpaged" ]; then
        echo "== ab: skipped: set AB_TREE to a folder holding another revision's jaxpaged/ package"
    else
        AB_TREE=$(cd "$AB_TREE" && pwd)
        for r in ${AB_RUNS:-}; do
            case $r in mixed|fixed|latency|structured|gemm) ;;
                *) echo "AB_RUNS: unknown run '$r' (mixed, fixed, latency, structured, gemm)"; exit 2;; esac
        done
        for round in $(seq "${ROUNDS:-1}"); do
            order="base this"; [ $((round % 2)) = 0 ] && order="this base"
            for v in $order; do
                tree=$([ $v = base ] && echo "$AB_TREE" || echo "$PWD")
                ab=(env PYTHONPATH=$tree${PYTHONPATH:+:$PYTHONPATH} $PY)
                runs=" ${AB_RUNS:-mixed fixed latency} "
                [[ $runs == *" mixed "* ]] && run ab-mixed-$v-$round 300 "${ab[@]}" scripts/benchmark_throughput.py \
                    "${SRC[@]}" --workload mixed --no-progress --no-replay --compilation-cache "$CACHE-ab-$v" \
                    --json "$OUT/ab-mixed-$v-$round.json" ${THROUGHPUT_ARGS:-}
                [[ $runs == *" fixed "* ]] && run ab-fixed-$v-$round 200 "${ab[@]}" scripts/benchmark_throughput.py \
                    "${SRC[@]}" --workload fixed --no-progress --compilation-cache "$CACHE-ab-$v" \
                    --json "$OUT/ab-fixed-$v-$round.json" ${THROUGHPUT_ARGS:-}
                [[ $runs == *" latency "* ]] && run ab-latency-$v-$round 200 "${ab[@]}" scripts/benchmark_latency.py \
                    "${SRC[@]}" --max-model-len 2048 --prompt-lens 512 --batches 1 --compilation-cache "$CACHE-ab-$v" \
                    --json "$OUT/ab-latency-$v-$round.json" ${LATENCY_ARGS:-}
                [[ $runs == *" structured "* ]] && run ab-structured-$v-$round 300 "${ab[@]}" \
                    scripts/benchmark_structured.py --model-dir "${BPE_MODEL:-.cache/llama3-8b-bpe}" \
                    --compilation-cache "$CACHE-ab-$v" --json "$OUT/ab-structured-$v-$round.json"
                [[ $runs == *" gemm "* ]] && run ab-gemm-$v-$round 200 "${ab[@]}" scripts/bench_gemm.py \
                    --kinds bf16,fp8,int4,int4_dequant
            done
        done
    fi
fi

echo
echo "######## summary ($((SECONDS - SUITE_START)) s in all: ${TIMES[*]/%/,})"
$PY scripts/run_summary.py "$OUT"
if want ab; then
    $PY scripts/run_summary.py --ab "$OUT"
    for f in "$OUT"/ab-structured-*.log "$OUT"/ab-gemm-*.log; do
        [ -f "$f" ] && echo "$(basename "$f" .log):" && sed -n '/^run \|^kind /,$p' "$f"
    done
fi
for f in "$OUT"/kernels-table.log "$OUT"/kernels-b256-table.log "$OUT"/mosaic-prefill-table.log; do
    [ -f "$f" ] || continue
    grep -E "^copy bandwidth" "$f"
    grep -E "^\| [^|]*\| (pallas \(default|pallas mode=fused|dense dot_product_attention cudnn|dense attention_mgpu|paged mosaic)" "$f" \
        | cut -d'|' -f2-5,7 | sed 's/ *| */ | /g'
done
for f in "$OUT"/gemm-*.log; do
    [ -f "$f" ] && sed -n '/^kind /,$p' "$f"
done
for f in "$OUT"/splitkv*-table.log; do
    [ -f "$f" ] || continue
    echo "$(basename "$f" -table.log):"
    grep -E "^\| loop" "$f" | cut -d'|' -f2-5 | sed 's/ *| */ | /g'
done
