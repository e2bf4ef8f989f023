"""Where a step's time goes: device kernels by kind, host events, and XLA's CUDA graphs.

    python scripts/profile_step.py --model-shape llama3-8b --batch 256 --input-len 512 --out /tmp/prof

Adds `--batch` requests of `--input-len` random tokens to an engine, traces (jax.profiler)
`--steps` steps of the prefill phase and, once every request decodes, `--steps` decode
steps (with `--mixed-prompt-len`, then the steps where one more request's prompt prefills
beside those decodes), and prints per phase: kernel time per step by kind (GEMM, attention,
fusion, NCCL, copy), the top kernels, wall per step, and the host's longest events. `--hlo` prints, per
phase, its forward's optimized HLO entry computation (op counts, custom calls) and what each
of its top fusion kernels computes (`hlo_report.py`); which CUDA graph (`command_buffer_N`)
runs each kernel shows in the profile's kernel names, not in the HLO text (jax 0.11.2). `--gil` checks
whether the step's dispatch releases the GIL (a dispatch thread could then overlap the
host's other work). With `--attention-backend mosaic` at `--max-model-len 4352` the traced run
failed with CUDA_ERROR_LAUNCH_FAILED under CUDA graphs (H100, jax 0.11.2; the same steps ran
clean untraced): `XLA_FLAGS=--xla_gpu_enable_command_buffer=` profiles it.
"""
from __future__ import annotations

import argparse
import collections
import glob
import re
import threading
import time
from pathlib import Path

import numpy as np
from benchmark_throughput import SHAPES, enable_compilation_cache, shape_dir
from hlo_report import describe_fusions, hlo_report

from jaxpaged.serve.cli_args import int_list

KINDS = [("attention", r"paged_attention"), ("nccl", r"nccl"), ("gemm", r"gemm|cutlass|nvjet|xmma|cublas|matmul"),
         ("copy", r"memcpy|memset|copy"), ("fusion", r".")]


def kind(name: str) -> str:
    return next(k for k, pat in KINDS if re.search(pat, name, re.I))


def trace(fn, out: Path, label: str):
    """Run `fn` under the profiler; return the xspace file's ProfileData."""
    import jax
    from jax.profiler import ProfileData

    d = out / label
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # C++ events only: Python frames would slow the host
    with jax.profiler.trace(str(d), profiler_options=options):
        fn()
    return ProfileData.from_file(sorted(glob.glob(f"{d}/**/*.xplane.pb", recursive=True))[-1])


def gpu_events(prof):
    """The kernel (and copy) events of every GPU stream in a profile."""
    for plane in prof.planes:
        if plane.name.startswith("/device:GPU"):
            for line in plane.lines:
                if line.name.startswith("Stream"):
                    yield from line.events


def summarize(prof, label: str, steps: int, wall: float, top: int = 16) -> list[str]:
    kernels, host = collections.Counter(), collections.Counter()
    counts, ops = collections.Counter(), {}
    for e in gpu_events(prof):
        kernels[e.name] += e.duration_ns
        counts[e.name] += 1
        if e.name not in ops:
            st = dict(e.stats)
            ops[e.name] = f"{st.get('hlo_module', '')}:{st.get('hlo_op', '')}"
    for plane in prof.planes:
        if plane.name.startswith("/host"):
            for line in plane.lines:
                for e in line.events:
                    host[e.name] += e.duration_ns
    by_kind = collections.Counter()
    for name, ns in kernels.items():
        by_kind[kind(name)] += ns
    devices = max(1, sum(p.name.startswith("/device:GPU") for p in prof.planes))
    total = sum(by_kind.values()) / 1e6 / steps / devices
    print(f"\n== {label}: {steps} steps, wall {1e3 * wall / steps:.2f} ms/step, kernels {total:.2f} ms/step/GPU "
          f"({sum(counts.values()) // steps // devices} kernel launches per step per GPU)")
    print("  " + ", ".join(f"{k} {ns / 1e6 / steps / devices:.2f}" for k, ns in by_kind.most_common()))
    print("  top kernels (ms/step/GPU, launches/step, us each, kernel, module:HLO op):")
    for name, ns in kernels.most_common(top):
        print(f"    {ns / 1e6 / steps / devices:7.3f} {counts[name] / steps / devices:6.1f} {ns / 1e3 / counts[name]:7.1f}"
              f"  {name[:60]}  {ops[name][:70]}")
    print("  top host events (ms/step, summed over threads):")
    for name, ns in host.most_common(12):
        print(f"    {ns / 1e6 / steps:8.3f}  {name[:110]}")
    return [name for name, _ in kernels.most_common(top)]


def gil_check(dispatch, wait) -> None:
    """Does dispatch release the GIL? A pure-Python loop's time alone, and alongside a thread
    that dispatches steps (waiting for each outside the timed call) until the loop ends."""
    def python_work():
        x = 0
        for i in range(5_000_000):
            x += i

    python_work()
    t = time.perf_counter(); python_work(); alone = time.perf_counter() - t
    done, inside = threading.Event(), []

    def dispatches():
        while not done.is_set():
            t = time.perf_counter()
            out = dispatch()
            inside.append(time.perf_counter() - t)
            wait(out)

    th = threading.Thread(target=dispatches)
    th.start()
    t = time.perf_counter(); python_work(); both = time.perf_counter() - t
    done.set(); th.join()
    print(f"\n== GIL: python loop alone {1e3 * alone:.0f} ms, alongside dispatching {1e3 * both:.0f} ms; "
          f"the other thread made {len(inside)} dispatches taking {1e3 * sum(inside):.0f} ms "
          f"(GIL held throughout: ~{1e3 * (alone + sum(inside)):.0f} ms; released: ~{1e3 * alone:.0f} ms)")


def cmdbuf_check(runner, rec, out: Path) -> None:
    """Host time of the forward's dispatch and its CUDA-graph updates (`command_buffer::update`
    events), with the engine's fresh host inputs per call vs one device-resident input reused:
    XLA re-records the graph's commands whose buffer addresses changed since the last call."""
    import jax

    _, step_buf, layout, mql = rec[:4]
    dev_buf = jax.device_put(step_buf)
    for label, buf in (("fresh host inputs", step_buf), ("device inputs reused", dev_buf)):
        def call():
            hidden, runner.kv = runner._fwd(runner.params, runner.kv, buf, runner.prev_tokens, layout=layout,
                                            max_query_len=mql)
            return hidden

        times = []
        for _ in range(12):
            t = time.perf_counter()
            h = call()
            times.append(time.perf_counter() - t)
            jax.block_until_ready(h)

        def five():
            for _ in range(5):
                jax.block_until_ready(call())

        prof = trace(five, out, "cmdbuf")
        upd = [e.duration_ns for p in prof.planes for ln in p.lines for e in ln.events
               if e.name == "command_buffer::update"]
        print(f"\n== dispatch, {label}: {1e3 * float(np.median(times)):.2f} ms per call (median of 12); "
              f"{len(upd)} graph updates in 5 calls, {sum(upd) / 5e6:.2f} ms per call")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-shape", choices=list(SHAPES), default="llama3-8b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as the benchmark workloads")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--num-kv-blocks", type=int, default=24000)
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    ap.add_argument("--quantization", "-q", default=None, help="fp8 / int8 / int4: the weights quantized at load")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto, fp8 (e4m3), fp8_e5m2: the KV pool's dtype")
    ap.add_argument("--attention-backend", default="auto", help="auto, pallas, mosaic, reference")
    ap.add_argument("--mixed-prompt-len", type=int, default=0,
                    help="after the decode phase, one request of this many tokens joins: a mixed phase")
    ap.add_argument("--token-buckets", type=int_list, default=None,
                    help="comma-separated padded step sizes (default: the engine's rule, 16 tokens and up)")
    ap.add_argument("--compilation-cache", default="/tmp/jaxpaged-xla-cache")
    ap.add_argument("--top", type=int, default=16, help="kernels listed per phase")
    ap.add_argument("--hlo", action="store_true")
    ap.add_argument("--gil", action="store_true")
    ap.add_argument("--cmdbuf", action="store_true")
    ap.add_argument("--out", default="/tmp/jaxpaged-profile")
    args = ap.parse_args()
    import jax

    from jaxpaged import LLM, SamplingParams

    enable_compilation_cache(args.compilation_cache)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    llm = LLM(str(shape_dir(args.model_shape)), load_format="dummy", max_model_len=args.max_model_len,
              max_num_seqs=args.batch + (args.mixed_prompt_len > 0), max_num_batched_tokens=args.max_num_batched_tokens,
              num_kv_blocks=args.num_kv_blocks, enable_prefix_caching=False,
              tensor_parallel_size=args.tensor_parallel_size, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype,
              token_buckets=args.token_buckets, attention_backend=args.attention_backend)
    engine, runner = llm.engine, llm.engine.runner
    rng = np.random.default_rng(0)
    vocab = engine.model_config.vocab_size
    for i in range(args.batch):
        engine.add_request(str(i), rng.integers(0, vocab, args.input_len).tolist(),
                           SamplingParams(temperature=args.temperature, max_tokens=args.max_model_len - args.input_len,
                                          ignore_eos=True, detokenize=False))
    records, phases = [], {}
    dispatch = runner.dispatch
    runner.dispatch = lambda *a: records.append(a) or dispatch(*a)

    def steps(n):
        for _ in range(n):
            engine.step()
        runner._dispatcher.submit(lambda: None).result()  # the dispatch thread is idle: the pool is safe to read
        jax.block_until_ready(runner.kv)

    print(f"{jax.devices()[0].device_kind} x {len(jax.devices())}, jax {jax.__version__}, tp {args.tensor_parallel_size}")
    prefill_steps = min(args.steps, -(-args.batch * args.input_len // args.max_num_batched_tokens) - 1)
    mixed_steps = min(args.steps, -(-args.mixed_prompt_len // max(1, args.max_num_batched_tokens - args.batch)))
    for label, n in (("prefill", prefill_steps), ("decode", args.steps), ("mixed", mixed_steps)):
        if n == 0:  # a prompt that fits one step leaves no prefill steps to trace
            continue
        if label == "mixed":  # its chunks share each step with the decodes
            engine.add_request("mixed", rng.integers(0, vocab, args.mixed_prompt_len).tolist(),
                               SamplingParams(temperature=args.temperature, max_tokens=1, detokenize=False))
        if label == "decode":  # until every request decodes, then a few more
            while any(s.num_computed_tokens < s.num_prompt_tokens for seqs in engine.core.requests.values() for s in seqs):
                engine.step()
            for _ in range(8):
                engine.step()
        t = time.perf_counter()
        prof = trace(lambda: steps(n), out, label)
        top = summarize(prof, f"{label} ({args.batch} requests, prompt {args.input_len}"
                        + (f"; one prompt of {args.mixed_prompt_len} prefilling)" if label == "mixed" else ")"),
                        n, time.perf_counter() - t, args.top)
        phases[label] = (records[-1], top)
    last = records[-1]
    for label, (rec, top) in phases.items() if args.hlo else ():
        _, step_buf, layout, mql = rec[:4]  # the phase's last step: its forward, compiled again (cached)
        text = runner._fwd.lower(runner.params, runner.kv, step_buf, runner.prev_tokens, layout=layout,
                                 max_query_len=mql).compile().as_text()
        hlo_report(text, out, f"forward_{label}")
        print(f"  {label}: the top kernels' fusions (output, kind: fused ops)")
        describe_fusions(text, top)
    if args.cmdbuf:
        cmdbuf_check(runner, last, out)
    if args.gil:
        gil_check(lambda: dispatch(*last), jax.block_until_ready)


if __name__ == "__main__":
    main()
