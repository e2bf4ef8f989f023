"""Long context: TTFT and decode ITL at 8k / 32k / 128k-token contexts, batch 1 and 8, against
the floor of one step (the weights plus every row's KV read once at the copy bandwidth), and a
RAG-like workload (N prompts of 16k tokens, 256 outputs each) with and without a shared 8k
prefix, prefix caching on.

    python scripts/benchmark_long_context.py --model-shape llama3-8b

The shape configs are Llama 3.1's (131,072 positions, llama3 RoPE scaling). A (context, batch)
whose KV does not fit the pool is skipped with the reason. Prompts are random token ids, each
drawn from its own seed, so the latency runs get no prefix-cache hits.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from benchmark_throughput import (SHAPES, enable_compilation_cache, recorded_dispatches, replay, shape_dir,
                                  wait_for_device)
from ceilings import ceilings


def _prompts(seed: list[int], n: int, length: int, vocab: int, prefix: list[int] | None = None) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    head = prefix or []
    return [head + rng.integers(0, vocab, length - len(head)).tolist() for _ in range(n)]


def _run(engine, prompts: list[list[int]], max_tokens: int, tag: str) -> None:
    from jaxpaged import SamplingParams

    p = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, p)


def decode_itl(engine, context: int, batch: int, steps: int, vocab: int) -> tuple[float, float]:
    """Median wall time of a decode step with `batch` rows at `context` tokens (after their
    prefill), and the mean device time of the same steps replayed back to back."""
    import jax

    _run(engine, _prompts([context, batch], batch, context, vocab), steps + 1, f"itl-{context}-{batch}")
    core = engine.core
    while any(not s.output_token_ids for seqs in core.requests.values() for s in seqs):
        engine.step()  # prefill
    wait_for_device(engine)  # the prefill's device work done before the timed steps
    times = []
    with recorded_dispatches(engine.runner) as records:
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
    jax.block_until_ready(records[0][0](*records[0][1]))
    return float(np.median(times)), replay(records)[0] / len(records)


def ttft(engine, context: int, vocab: int, reps: int) -> float:
    """Median time from add_request to the first token of one `context`-token prompt."""
    times = []
    for r in range(reps):
        t = time.perf_counter()
        _run(engine, _prompts([context, 0, r], 1, context, vocab), 1, f"ttft-{context}-{r}")
        while engine.has_unfinished_requests():
            engine.step()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def rag(engine, n: int, prompt_len: int, output_len: int, shared: int, vocab: int) -> dict:
    """N prompts of `prompt_len` tokens (the first `shared` of them common to all), `output_len`
    outputs each, all at once: wall time, output and total tok/s, prefix-cache hit rate, preemptions."""
    prefix = _prompts([prompt_len, shared, 1], 1, shared, vocab)[0] if shared else None
    bm = engine.core.block_manager
    q0, h0, p0 = bm.prefix_cache_queries, bm.prefix_cache_hits, engine.core.scheduler.num_preemptions
    _run(engine, _prompts([prompt_len, shared, 2], n, prompt_len, vocab, prefix), output_len, f"rag-{shared}")
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    wall = time.perf_counter() - t
    queries = bm.prefix_cache_queries - q0
    return {"wall_s": wall, "output_tok_s": n * output_len / wall, "total_tok_s": n * (prompt_len + output_len) / wall,
            "prefix_hit_rate": (bm.prefix_cache_hits - h0) / queries if queries else 0.0,
            "preemptions": engine.core.scheduler.num_preemptions - p0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model")
    src.add_argument("--model-shape", choices=list(SHAPES))
    ap.add_argument("--parts", default="latency,rag", help="latency, rag or both")
    ap.add_argument("--contexts", default="8192,32768,131000")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=131072)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--rag-prompts", type=int, default=128)
    ap.add_argument("--rag-prompt-len", type=int, default=16384)
    ap.add_argument("--rag-output-len", type=int, default=256)
    ap.add_argument("--rag-shared-prefix", type=int, default=8192)
    ap.add_argument("--quantization", "-q", default=None)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--token-buckets", default="16,64,1024,8192",
                    help="padded step sizes: these runs' decodes land in 16 (<= 8 rows) or 64 (RAG), prompt chunks "
                         "in the 8192 budget (the engine's default sizes took 7.8 minutes to compile and warm up "
                         "on a fresh H100)")
    ap.add_argument("--compilation-cache", default="/tmp/jaxpaged-xla-cache")
    ap.add_argument("--json")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    for c in contexts:
        if c + args.decode_steps + 1 > args.max_model_len:
            ap.error(f"context {c} + --decode-steps {args.decode_steps} + 1 exceeds --max-model-len {args.max_model_len}")
    import jax

    from jaxpaged import LLM

    enable_compilation_cache(args.compilation_cache)
    ceil = ceilings()  # before the engine: its KV pool takes the free memory
    llm = LLM(args.model or str(shape_dir(args.model_shape)), load_format="dummy" if args.model_shape else "auto",
              quantization=args.quantization, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, attention_backend=args.attention_backend,
              num_kv_blocks=args.num_kv_blocks, enable_prefix_caching=True,
              token_buckets=tuple(int(t) for t in args.token_buckets.split(",")) if args.token_buckets else None)
    engine = llm.engine
    cfg = engine.model_config
    bw = ceil["copy_bytes_per_s"]
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(engine.runner.params))
    kv = engine.runner.kv  # bytes per token from the pool itself (its dtype, any scales)
    kv_token = sum(x.nbytes for x in jax.tree.leaves(kv)) // (kv.num_blocks * kv.block_size)
    capacity = engine.startup["kv_capacity_tokens"]
    rows, skipped, rag_rows = [], [], {}
    block = engine.config.block_size

    def fits(rows: int, tokens: int, what: str) -> bool:  # the pool holds `rows` sequences of `tokens`
        need = rows * -(-tokens // block) * block
        if need > capacity:
            skipped.append(f"{what}: needs {need} tokens of KV, the pool holds {capacity}")
        return need <= capacity

    if "latency" in parts:
        for c in contexts:
            if fits(1, c + 1, f"TTFT context {c}"):
                rows.append((f"TTFT, context {c}", ttft(engine, c, cfg.vocab_size, 1 if c > 32768 else 3), None))
            for b in batches:
                if not fits(b, c + args.decode_steps + 1, f"ITL context {c} batch {b}"):
                    continue
                itl, device = decode_itl(engine, c, b, args.decode_steps, cfg.vocab_size)
                floor = (weight_bytes + b * c * kv_token) / bw
                rows.append((f"ITL, context {c}, batch {b}", itl, floor))
                rows.append(("  its device time", device, floor))
    if "rag" in parts and fits(1, args.rag_prompt_len + args.rag_output_len, "RAG"):
        for shared in (0, args.rag_shared_prefix):
            rag_rows[shared] = rag(engine, args.rag_prompts, args.rag_prompt_len, args.rag_output_len, shared,
                                   cfg.vocab_size)
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}; weights {weight_bytes / 1e9:.2f} GB, "
          f"KV {kv_token / 1024:.0f} KiB/token, pool {capacity} tokens, copy {bw / 1e12:.2f} TB/s")
    for s in skipped:
        print("skipped:", s)
    print(f"{'measure':34s} {'ms':>10s} {'floor ms':>9s} {'x floor':>8s}")
    for name, s, floor in rows:
        print(f"{name:34s} {s * 1e3:10.2f} " + (f"{floor * 1e3:9.2f} {s / floor:8.2f}" if floor else ""))
    for shared, r in rag_rows.items():
        print(f"RAG {args.rag_prompts} x {args.rag_prompt_len} -> {args.rag_output_len}, shared prefix {shared}: "
              f"{r['wall_s']:.1f} s, {r['output_tok_s']:.0f} output tok/s, {r['total_tok_s']:.0f} total tok/s, "
              f"prefix hits {r['prefix_hit_rate']:.0%}, {r['preemptions']} preemptions")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "device": jax.devices()[0].device_kind,
            "args": vars(args), "ceilings": ceil, "kv_capacity_tokens": capacity, "skipped": skipped,
            "latency": [{"measure": n, "seconds": s, "floor_s": f} for n, s, f in rows],
            "rag": {str(k): v for k, v in rag_rows.items()}}, indent=2))


if __name__ == "__main__":
    main()
