"""Offline throughput, like `vllm bench throughput`: all requests at once, in process.

    python scripts/benchmark_throughput.py --model-shape llama3-8b --workload mixed --compare hf

Workloads: `fixed` = N prompts x --input-len tokens, --output-len outputs; `mixed` = input
and output lengths uniform in [--min-len, --max-len] (numpy default_rng(seed): inputs drawn
first, then outputs). Greedy unless --temperature, EOS ignored. Prints requests/s, output and
total tok/s, the workload's roofline floor against ceilings measured in the same run, and the
share of wall time the device was busy; `--compare hf` first runs HF transformers `generate`
in static batches on the same prompts in a subprocess (so each framework has the whole GPU to
itself), then jaxpaged, and prints the ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ceilings import ceilings
from workloads import workload

SHAPES = {  # HF config.json fields of known architectures (random weights, load_format=dummy)
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def shape_config(name: str) -> dict:
    """The HF config.json fields of a known shape (bf16, Llama 3 RoPE)."""
    return dict(SHAPES[name], architectures=["LlamaForCausalLM"], model_type="llama", dtype="bfloat16",
                max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=128000,
                eos_token_id=128001, rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                          low_freq_factor=1.0, high_freq_factor=4.0,
                                                          original_max_position_embeddings=8192))


def shape_dir(name: str) -> Path:
    """A model directory holding only the config.json of a known shape."""
    d = Path(tempfile.mkdtemp(prefix=f"jaxpaged-{name}-"))
    (d / "config.json").write_text(json.dumps(shape_config(name)))
    return d


def enable_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache: a second run of the same shapes skips compiles."""
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def roofline(cfg, prompts, outs, max_num_seqs: int, ceil: dict, dtype_bytes: int = 2, kv_bytes: int = 2) -> float:
    """Lower bound on the workload's time: weight and KV reads at the copy bandwidth vs FLOPs
    (`kv_bytes` per K/V value: 1 for an fp8 KV cache)."""
    d, l = cfg.head_dim, cfg.num_layers
    n_params = (cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
                + l * (cfg.hidden_size * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
                       + 3 * cfg.hidden_size * cfg.intermediate_size))
    kv_per_token = 2 * l * cfg.num_kv_heads * d * kv_bytes
    steps = max(max(outs), -(-sum(outs) // max_num_seqs))  # decode steps at the least
    kv_read = sum(kv_per_token * (p * o + o * (o + 1) // 2) for p, o in zip(map(len, prompts), outs))
    tokens = sum(map(len, prompts)) + sum(outs)
    attn_flops = sum(4 * l * cfg.num_heads * d * (p * p / 2 + p * o + o * o / 2) for p, o in zip(map(len, prompts), outs))
    mem_s = (steps * n_params * dtype_bytes + kv_read) / ceil["copy_bytes_per_s"]
    flop_s = (2 * n_params * tokens + attn_flops) / ceil["matmul_flops_per_s"]
    return max(mem_s, flop_s)


def time_calls(obj, name: str, totals: dict) -> None:
    """Wrap `obj.name` to add its wall time to `totals[name]` (host-side step breakdown); an
    older revision's engine (A/B runs) may lack it."""
    fn = getattr(obj, name, None)
    if fn is None:
        return

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - t

    setattr(obj, name, timed)


@contextlib.contextmanager
def recorded_dispatches(runner, drafter=None):
    """Inside: every step dispatch (`runner.dispatch`, `dispatch_loop` for multi-step decode,
    `dispatch_verify` for speculative steps, and a draft model's `drafter.dispatch`) is appended
    to the yielded list with its arguments (the packed host inputs of the step) as (function,
    args); `replay` runs them again."""
    records = []

    def recording(fn):
        def call(*a):
            records.append((fn, a))
            return fn(*a)
        return call

    names = [(runner, n) for n in ("dispatch", "dispatch_loop", "dispatch_verify") if hasattr(runner, n)]  # (older revisions)
    names += [(drafter, "dispatch")] if hasattr(drafter, "dispatch") else []
    for obj, n in names:
        setattr(obj, n, recording(getattr(obj, n)))
    try:
        yield records
    finally:
        for obj, n in names:
            delattr(obj, n)  # the class's methods again


def wait_for_device(engine) -> None:
    """Block until the device work of every launched step is done: a benchmark's prefill before
    its timed steps (launched, not processed: a request's pending tokens count in
    `output_token_ids`)."""
    import jax

    for launched in getattr(getattr(engine, "core", engine), "_in_flight", ()):
        jax.block_until_ready(launched.outputs.result())


def replay(records) -> tuple[float, dict]:
    """Run the recorded steps again: all back to back, waiting only at the end (the device time
    of the workload without the host's gaps; dispatch counts where it is slower than the
    device), then each token bucket's steps back to back for its ms per step (the same: the
    dispatch is hidden unless slower than the device, except the first step's; a multi-step
    decode bucket is keyed "T xK", a draft model's program "T draft"). Feeds back the replay's own
    tokens, which does not change the work."""
    import jax

    from jaxpaged.engine.host_buffer import field_shape

    t = time.perf_counter()
    jax.block_until_ready([fn(*a) for fn, a in records])  # every output: off the GPU, steps may overlap
    total = time.perf_counter() - t
    by_bucket: dict[str, list] = {}
    for fn, a in records:
        draft = len(a) == 2  # a draft model's (buf, layout); the runner's a[2] is the step layout
        layout = a[1] if draft else a[2]
        tokens = field_shape(layout, "token_ids")[0]
        keys = field_shape(layout, "keys")  # [K, S, 2] in a decode loop's layout
        loop = keys[0] if keys is not None and len(keys) == 3 else None
        by_bucket.setdefault(f"{tokens}" + (f" x{loop}" if loop else "") + (" draft" if draft else ""),
                             []).append((fn, a))
    per_bucket = {}
    for b, recs in sorted(by_bucket.items(), key=lambda kv: (int(kv[0].split()[0]), kv[0])):
        t = time.perf_counter()
        jax.block_until_ready([fn(*a) for fn, a in recs])
        per_bucket[b] = {"steps": len(recs), "mean_ms": 1e3 * (time.perf_counter() - t) / len(recs)}
    return total, per_bucket


def compile_events() -> dict:
    """Counters of JAX's compile and persistent-cache events in this process (start-up profile)."""
    import jax

    counts: dict[str, float] = {}
    jax.monitoring.register_event_listener(lambda event, **kw: counts.__setitem__(event, counts.get(event, 0) + 1))
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: counts.__setitem__(event + " s", counts.get(event + " s", 0.0) + secs))
    return counts


def run_jaxpaged(args, model: str, prompts, outs) -> dict:
    from tqdm import tqdm

    from jaxpaged import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model, load_format=args.load_format, dtype=args.dtype, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization, attention_backend=args.attention_backend,
              num_kv_blocks=args.num_kv_blocks, enable_prefix_caching=False,
              async_scheduling=args.async_scheduling, max_steps_in_flight=args.max_steps_in_flight,
              num_scheduler_steps=args.num_scheduler_steps,
              tensor_parallel_size=args.tensor_parallel_size,
              compile_threads=args.compile_threads, block_size=args.block_size,
              token_buckets=args.token_buckets,
              **({"speculative_config": args.speculative_config} if args.speculative_config else {}),
              **({"long_prefill_token_threshold": t} if (t := args.long_prefill_token_threshold) else {}),
              **({"decoding_token_budget": t} if (t := args.decoding_token_budget) is not None else {}))
    engine = llm.engine
    startup = time.perf_counter() - t0
    for i, (p, o) in enumerate(zip(prompts, outs)):
        engine.add_request(str(i), p, SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=i,
                                                     max_tokens=o, ignore_eos=True, detokenize=False))
    core = getattr(engine, "core", engine)  # an older revision's engine (A/B runs) has no separate core
    device0, steps, generated = engine.runner.device_wait_seconds, 0, 0
    breakdown: dict[str, float] = {}  # where the host's time per step goes
    for obj, name in [(engine.scheduler, "schedule"), (engine.runner, "launch"), (engine.runner, "dispatch"),
                      (engine.runner, "dispatch_loop"), (engine.runner, "fetch"), (core, "_process"),
                      (engine.output, "process_outputs")]:
        time_calls(obj, name, breakdown)
    t = time.perf_counter()
    with recorded_dispatches(engine.runner, getattr(core, "drafter", None)) as records, \
            tqdm(total=len(prompts), desc="jaxpaged", disable=args.no_progress) as bar:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    generated += len(out.outputs[0].token_ids)
                    bar.update(1)
            steps += 1
    wall = time.perf_counter() - t
    assert generated == sum(outs), (generated, sum(outs))
    device_wait = (engine.runner.device_wait_seconds - device0) / wall  # before the replay adds to it
    breakdown = {k: v / steps * 1e3 for k, v in breakdown.items()}  # ms per step (before the replay adds to
    device_s, device_by_bucket = replay(records) if args.replay else (None, {})  # it); nested: launch > dispatch,
    return {"wall_s": wall, "startup_s": startup, "steps": steps, "engine": engine.startup,
            "host_ms_per_step": breakdown,
            "device_wait": device_wait, "cfg": engine.model_config,
            "device_s": device_s, "device_busy": device_s and min(1.0, device_s / wall), "device_by_bucket": device_by_bucket,
            "preemptions": engine.scheduler.num_preemptions, "spec_decode": spec_decode_summary(core)}


def spec_decode_summary(core) -> dict | None:
    """Speculative decoding's counters (vLLM's names), acceptance rate and mean accepted length
    (tokens per verified row: 1 + accepted / drafts); None without speculation."""
    stats = getattr(core, "spec_stats", None)
    if stats is None or not stats.num_drafts:
        return None
    return {"num_drafts": stats.num_drafts, "num_draft_tokens": stats.num_draft_tokens,
            "num_accepted_tokens": stats.num_accepted_tokens, "acceptance_rate": stats.num_accepted_tokens / stats.num_draft_tokens,
            "mean_accepted_length": 1 + stats.num_accepted_tokens / stats.num_drafts,
            "accepted_per_pos": list(stats.num_accepted_tokens_per_pos)}


def run_hf_subprocess() -> dict:
    """This script again with the same arguments in `--hf-worker` mode (HF only), before JAX
    takes the GPU: torch's memory is the driver's again when the worker exits."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--hf-worker", f.name], check=True)
        return json.loads(Path(f.name).read_text())


def hf_worker(args) -> None:
    """`--hf-worker FILE`: run HF on the workload, write its result to FILE (no JAX)."""
    import transformers

    model = args.model or str(shape_dir(args.model_shape))
    prompts, outs = workload(args, transformers.AutoConfig.from_pretrained(model).vocab_size)
    Path(args.hf_worker).write_text(json.dumps(run_hf(args, model, prompts, outs)))


def run_hf(args, model_dir: str, prompts, outs) -> dict:
    """HF transformers `generate` in static batches (left padded; a batch runs to its longest),
    on the GPU when torch sees one; random weights for a --model-shape."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        if args.model_shape:
            hf_cfg = transformers.AutoConfig.from_pretrained(model_dir)
            model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    t = time.perf_counter()
    for i in range(0, len(prompts), args.hf_batch_size):
        batch, n_out = prompts[i:i + args.hf_batch_size], max(outs[i:i + args.hf_batch_size])
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        gen = transformers.GenerationConfig(max_new_tokens=n_out, min_new_tokens=n_out, do_sample=False,
                                            eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        if device == "cuda":
            torch.cuda.synchronize()
    return {"wall_s": time.perf_counter() - t, "device": device}


def main() -> None:
    try:  # (jax reads the memory settings below only when a backend starts)
        from jaxpaged.serve.cli_args import int_list
    except ImportError:  # an older revision's package (A/B runs)
        from jaxpaged.serve.cli import int_list

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF model directory")
    src.add_argument("--model-shape", choices=list(SHAPES), help="random bf16 weights of a known shape")
    ap.add_argument("--load-format", default=None, choices=["auto", "dummy"])
    ap.add_argument("--workload", default="fixed", choices=["fixed", "mixed"])
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the workloads' setting)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", "-q", default=None,
                    help="fp8 / int8 / int4: the weights quantized at load (random ones too); docs/quantization.md")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto, fp8 (e4m3), fp8_e5m2: the KV pool's dtype")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--long-prefill-token-threshold", type=int, default=0, help="most tokens of one prompt per step")
    ap.add_argument("--decoding-token-budget", type=int, default=None,
                    help="token budget of a step that carries decodes, without a backlog (engine arg)")
    ap.add_argument("--token-buckets", type=int_list, default=None,
                    help="comma-separated padded step sizes (default: the engine's)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    ap.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false")
    ap.add_argument("--max-steps-in-flight", type=int, default=2)
    ap.add_argument("--num-scheduler-steps", type=int, default=1, help="multi-step decode iterations per step")
    ap.add_argument("--speculative-config", type=json.loads, default=None,
                    help='speculative decoding (docs/spec_decode.md), e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
                         '"synthetic_acceptance_rate": 0.8}\' for the synthetic acceptance mode; '
                         '\'{"method": "draft_model", "model": DIR, "num_speculative_tokens": 4}\' for a draft model'),
    ap.add_argument("--num-kv-blocks", type=int, default=None, help="fixed pool size (same shapes across runs)")
    ap.add_argument("--compilation-cache", default="/tmp/jaxpaged-xla-cache", help="JAX persistent cache dir")
    ap.add_argument("--compile-threads", type=int, default=None, help="warm-up compile threads (default: CPUs)")
    ap.add_argument("--compare", choices=["hf"], default=None)
    ap.add_argument("--hf-batch-size", type=int, default=64)
    ap.add_argument("--no-replay", dest="replay", action="store_false",
                    help="skip replaying the steps (device busy and per-bucket device time)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--hf-worker", help=argparse.SUPPRESS)  # internal: the HF subprocess of --compare hf
    args = ap.parse_args()
    if args.hf_worker:
        return hf_worker(args)
    hf = run_hf_subprocess() if args.compare == "hf" else None
    import jax

    from jaxpaged.models import load_config

    enable_compilation_cache(args.compilation_cache)

    model = args.model or str(shape_dir(args.model_shape))
    args.load_format = args.load_format or ("dummy" if args.model_shape else "auto")
    cfg = load_config(model)
    prompts, outs = workload(args, cfg.vocab_size)
    ceil = ceilings()  # before the engine: its KV pool takes the free memory
    events = compile_events()
    res = run_jaxpaged(args, model, prompts, outs)
    res["compile_events"] = {k: v for k, v in events.items() if "compil" in k}
    floor = roofline(cfg, prompts, outs, args.max_num_seqs, ceil,  # N GPUs' ceilings
                     kv_bytes=1 if args.kv_cache_dtype.startswith("fp8") else 2) / args.tensor_parallel_size
    n_in, n_out = sum(map(len, prompts)), sum(outs)
    rows = [("jaxpaged", res["wall_s"])]
    if hf:
        rows.append((f"HF generate (static batches of {args.hf_batch_size})", hf["wall_s"]))
    summary = {
        "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "device": jax.devices()[0].device_kind,
        "args": vars(args), "ceilings": ceil, "roofline_s": floor, "input_tokens": n_in, "output_tokens": n_out,
        "jaxpaged": {k: v for k, v in res.items() if k != "cfg"} | {
            "requests_per_s": len(prompts) / res["wall_s"], "output_tok_per_s": n_out / res["wall_s"],
            "total_tok_per_s": (n_in + n_out) / res["wall_s"], "roofline_fraction": floor / res["wall_s"]},
    }
    if hf:
        summary["hf"] = hf | {"output_tok_per_s": n_out / hf["wall_s"], "speedup": hf["wall_s"] / res["wall_s"]}
    print(f"\n{args.workload} workload: {len(prompts)} prompts, {n_in} input / {n_out} output tokens; "
          f"{summary['device']}, jax {jax.__version__}")
    print(f"ceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, matmul {ceil['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s;"
          f" roofline floor {floor:.1f} s")
    print(f"{'engine':44s} {'wall s':>8s} {'req/s':>7s} {'out tok/s':>10s} {'total tok/s':>12s}")
    for name, wall in rows:
        print(f"{name:44s} {wall:8.1f} {len(prompts) / wall:7.2f} {n_out / wall:10.0f} {(n_in + n_out) / wall:12.0f}")
    j = summary["jaxpaged"]
    print(f"jaxpaged: {j['roofline_fraction']:.0%} of the roofline, host waited on the device {j['device_wait']:.0%} of wall, "
          f"{res['steps']} steps, {res['preemptions']} preemptions, startup {res['startup_s']:.0f} s")
    if res["device_s"] is not None:
        print(f"device busy {j['device_busy']:.0%} of wall (the steps replayed back to back took {res['device_s']:.2f} s)")
    if res["spec_decode"]:
        print("speculative decoding: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in res["spec_decode"].items()))
    print("start-up " + str({k: v for k, v in res["engine"].items() if k != "compiles"}))
    compiles = sorted(res["engine"]["compiles"], key=lambda c: -c[2])
    print(f"start-up programs: {len(compiles)}, {sum(c[2] for c in compiles):.0f} s summed; slowest (program, start s, "
          f"s): {compiles[:6]}")
    print("device ms per step by token bucket (its steps replayed back to back): " + ", ".join(
        f"{b}: {v['steps']} x {v['mean_ms']:.2f}" for b, v in res["device_by_bucket"].items()))
    print("compile events: " + ", ".join(f"{k.removeprefix('/jax/')} {v:.1f}" for k, v in res["compile_events"].items()))
    print("host ms per step (launch includes dispatch; fetch = the wait for the device): "
          + ", ".join(f"{k} {v:.2f}" for k, v in res["host_ms_per_step"].items()))
    if hf:
        print(f"speedup over HF: {summary['hf']['speedup']:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
