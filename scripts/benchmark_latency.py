"""Latency on an idle engine: decode inter-token latency at batch 1 and 8, and prefill (TTFT)
by prompt length, against the weight-read floor (weights / copy bandwidth, measured now).

    python scripts/benchmark_latency.py --model-shape llama3-8b
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from benchmark_throughput import (SHAPES, enable_compilation_cache, recorded_dispatches, replay, shape_dir,
                                  spec_decode_summary, wait_for_device)
from ceilings import ceilings

from jaxpaged.serve.cli_args import int_list


def decode_itl(engine, batch: int, prompt_len: int, steps: int, vocab: int,
               prompt: list[int] | None = None) -> dict[str, float]:
    """Median time of one decode step with `batch` sequences running (after their prefill), and
    the device time per step of the same steps replayed back to back (where the ITL is above
    it, the host's dispatch is the limit). With speculative decoding a step emits several
    tokens: both are then per token (the decode's time over its `steps` tokens, mean), and the
    target forwards' share of the device time is replayed too (the rest: verify heads and the
    draft model). `prompt`: every row's prompt (a text task), else random ids of `prompt_len`."""
    import jax

    from jaxpaged import SamplingParams

    rng = np.random.default_rng(batch)
    p = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True, detokenize=False)
    for i in range(batch):
        engine.add_request(f"itl-{batch}-{i}", prompt or rng.integers(0, vocab, prompt_len).tolist(), p)
    core = getattr(engine, "core", engine)  # an older revision's engine (A/B runs) has no separate core
    while any(not s.output_token_ids for seqs in core.requests.values() for s in seqs):
        engine.step()  # prefill
    wait_for_device(engine)  # the prefill's device work done before the timed steps
    times = []
    with recorded_dispatches(engine.runner, getattr(core, "drafter", None)) as records:
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
    fn, a = records[0]
    jax.block_until_ready(fn(*a))
    device = replay(records)[0]
    if getattr(core, "drafter", None) is None:
        return {f"decode ITL, batch {batch}": float(np.median(times)),
                f"  its device time, batch {batch}": device / len(records)}
    run_forward = getattr(engine.runner, "run_forward", None) or engine.runner._run_forward  # (older revisions)
    forwards = [a[1:4] for _, a in records if len(a) > 2]  # the runner's (variant, buf, layout, max_query_len, ..)
    t = time.perf_counter()
    jax.block_until_ready([run_forward(*f) for f in forwards])
    return {f"decode ITL, batch {batch}": sum(times) / steps, f"  its device time, batch {batch}": device / steps,
            f"  its forwards, batch {batch}": (time.perf_counter() - t) / steps}


def ttft(engine, prompt_len: int, vocab: int, reps: int = 3) -> tuple[float, float]:
    """Median time from add_request to the first token of one prompt, and the median device
    time of the same steps replayed (the rest of TTFT is host work)."""
    from jaxpaged import SamplingParams

    rng = np.random.default_rng(prompt_len)
    times, device = [], []
    for r in range(reps):
        with recorded_dispatches(engine.runner) as records:  # (one token: no speculation)
            t = time.perf_counter()
            engine.add_request(f"ttft-{prompt_len}-{r}", rng.integers(0, vocab, prompt_len).tolist(),
                               SamplingParams(temperature=0, max_tokens=1, detokenize=False))
            while engine.has_unfinished_requests():
                engine.step()
            times.append(time.perf_counter() - t)
        device.append(replay(records)[0])
    return float(np.median(times)), float(np.median(device))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model")
    src.add_argument("--model-shape", choices=list(SHAPES))
    ap.add_argument("--prompt-lens", default="128,512,2048")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--decode-prompt-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--quantization", "-q", default=None,
                    help="fp8 / int8 / int4: the weights quantized at load (random ones too); docs/quantization.md")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto, fp8 (e4m3), fp8_e5m2: the KV pool's dtype")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: the largest batch")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    ap.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false")
    ap.add_argument("--max-steps-in-flight", type=int, default=2)
    ap.add_argument("--num-kv-blocks", type=int, default=None, help="fixed pool size (same shapes across runs)")
    ap.add_argument("--token-buckets", type=int_list, default=None,
                    help="comma-separated padded step sizes (the engine's token_buckets; default: its rule, 16 tokens "
                    "and up)")
    ap.add_argument("--compilation-cache", default="/tmp/jaxpaged-xla-cache", help="JAX persistent cache dir")
    ap.add_argument("--speculative-config", type=json.loads, default=None,
                    help='speculative decoding (docs/spec_decode.md), e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
                         '"synthetic_acceptance_rate": 0.8}\': the synthetic acceptance mode for random weights; '
                         '\'{"method": "draft_model", "model": DIR, "num_speculative_tokens": 4}\': a draft model')
    ap.add_argument("--prompt-file", help="decode on a text task instead of random ids: every row's prompt is "
                    "--prompt-template with {text} the file's text, through the model's chat template")
    ap.add_argument("--prompt-template", default="Repeat the following text exactly, word for word:\n\n{text}")
    ap.add_argument("--json")
    args = ap.parse_args()
    prompt_lens = [int(n) for n in args.prompt_lens.split(",")]
    for n in [n for n in prompt_lens if n >= args.max_model_len]:
        print(f"skipping TTFT of a {n}-token prompt: it needs --max-model-len above {n} (is {args.max_model_len})")
    if args.decode_prompt_len + args.decode_steps + 1 > args.max_model_len:
        ap.error(f"--decode-prompt-len {args.decode_prompt_len} + --decode-steps {args.decode_steps} + 1 exceeds "
                 f"--max-model-len {args.max_model_len}")
    import jax

    from jaxpaged import LLM

    enable_compilation_cache(args.compilation_cache)
    model = args.model or str(shape_dir(args.model_shape))
    ceil = ceilings()
    llm = LLM(model, load_format="dummy" if args.model_shape else "auto", quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs or max(int(b) for b in args.batches.split(",")),
              max_num_batched_tokens=args.max_num_batched_tokens, attention_backend=args.attention_backend,
              num_kv_blocks=args.num_kv_blocks, enable_prefix_caching=False,
              token_buckets=args.token_buckets,
              async_scheduling=args.async_scheduling, max_steps_in_flight=args.max_steps_in_flight,
              tensor_parallel_size=args.tensor_parallel_size,
              **({"speculative_config": args.speculative_config} if args.speculative_config else {}))
    engine = llm.engine
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(engine.runner.params))
    floor = weight_bytes / args.tensor_parallel_size / ceil["copy_bytes_per_s"]  # each GPU reads its shard
    vocab = engine.model_config.vocab_size
    rows, prompt = {}, None
    if args.prompt_file:
        text = args.prompt_template.format(text=Path(args.prompt_file).read_text())
        prompt = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": text}],
                                                         add_generation_prompt=True, tokenize=True)
        prompt = list(getattr(prompt, "input_ids", prompt))
        if len(prompt) + args.decode_steps + 1 > args.max_model_len:
            ap.error(f"the {len(prompt)}-token prompt + --decode-steps exceeds --max-model-len {args.max_model_len}")
    for b in args.batches.split(","):
        rows |= decode_itl(engine, int(b), args.decode_prompt_len, args.decode_steps, vocab, prompt)
    for n in [n for n in prompt_lens if n < args.max_model_len]:
        rows[f"TTFT, prompt {n}"], rows[f"  its device time, prompt {n}"] = ttft(engine, n, vocab)
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}; weights {weight_bytes / 1e9:.2f} GB, "
          f"copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s -> weight-read floor {floor * 1e3:.2f} ms")
    print(f"{'measure':28s} {'ms':>8s} {'x floor':>8s}")
    for name, s in rows.items():
        print(f"{name:28s} {s * 1e3:8.2f} {s / floor:8.2f}")
    spec = spec_decode_summary(engine.core)
    if spec:
        print("speculative decoding: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in spec.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
                                               "device": jax.devices()[0].device_kind, "args": vars(args),
                                               "floor_s": floor, "ceilings": ceil, "seconds": rows,
                                               "spec_decode": spec}, indent=2))


if __name__ == "__main__":
    main()
