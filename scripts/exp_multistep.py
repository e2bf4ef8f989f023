"""EXPERIMENT (session 7; run on the GPU in session 8, results in docs/parallel.md: yes, 2.5-7x
less host time per iteration): does one dispatch of K forward iterations (a static-bound
`lax.fori_loop`) cost the host less than K dispatches of one forward? Multi-step decode
(`--num-scheduler-steps`) was built on the answer.

    CUDA_VISIBLE_DEVICES=0,1 PYTHONPATH=. python scripts/exp_multistep.py --model-shape llama3-8b -tp 2 --k 1,4,8

Builds an engine (random weights) and takes the all-padding inputs of one token bucket
(GEMMs of the full bucket, no attention work: the question is the host). Per K, per forward
iteration: K calls of the engine's forward program (host time to issue them, then until the
device is done) against one call of a jitted `fori_loop` running the same forward K times.
Prints whether the loop's optimized HLO has a known trip count (XLA's GPU while thunk then
never reads the loop predicate on the host); whether the loop runs inside one CUDA graph
needs a profile (`profile_step.py` tags each kernel with its `command_buffer_N`).
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

if "--cpu-devices" in sys.argv:  # a CPU check of the script: N fake devices
    n = sys.argv[sys.argv.index("--cpu-devices") + 1]
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"

import jax
import jax.numpy as jnp
from benchmark_throughput import SHAPES, enable_compilation_cache, shape_dir
from jax import lax


def timed(run, reps: int) -> tuple[float, float]:
    """Median (seconds to return, seconds until the outputs are ready) over `reps` runs."""
    issue, total = [], []
    for _ in range(reps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        out = run()
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        issue.append(t1 - t0)
        total.append(time.perf_counter() - t0)
    return statistics.median(issue[1:]), statistics.median(total[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model")
    src.add_argument("--model-shape", choices=list(SHAPES))
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    ap.add_argument("--bucket", type=int, default=256, help="token bucket (rows) of the forward")
    ap.add_argument("--k", default="1,4,8", help="forward iterations per dispatch")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cpu-devices", type=int, default=None, help="CPU check: this many fake devices")
    ap.add_argument("--compilation-cache", default="/tmp/jaxpaged-xla-cache")
    a = ap.parse_args()

    from jaxpaged import LLM

    enable_compilation_cache(a.compilation_cache)
    model = a.model or str(shape_dir(a.model_shape))
    llm = LLM(model, load_format="dummy" if a.model_shape else "auto", max_model_len=2048, max_num_seqs=a.bucket,
              max_num_batched_tokens=2048, num_kv_blocks=2000, enable_prefix_caching=False,
              tensor_parallel_size=a.tensor_parallel_size, token_buckets=(a.bucket,))
    runner = llm.engine.runner
    _, (buf, layout, max_query_len), _, _ = runner.inputs.build([], [], a.bucket, "greedy")
    # the engine's forward function (model config and attention kernel bound), unjitted
    forward = functools.partial(runner._fwd.__wrapped__, layout=layout, max_query_len=max_query_len)

    @functools.partial(jax.jit, donate_argnums=1, static_argnames="k")
    def loop(params, kv, buf, prev, *, k: int):
        def body(_, carry):
            return forward(params, carry[1], buf, prev)

        hidden = jnp.zeros((a.bucket, runner.cfg.hidden_size), runner.params["embed"].dtype)
        return lax.fori_loop(0, k, body, (hidden, kv))

    def separate(k: int):
        out = None
        for _ in range(k):
            out, runner.kv = runner._fwd(runner.params, runner.kv, buf, runner._prev_tokens, layout=layout,
                                         max_query_len=max_query_len)
        return out

    def looped(k: int):
        out, runner.kv = loop(runner.params, runner.kv, buf, runner._prev_tokens, k=k)
        return out

    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind} x {a.tensor_parallel_size}, bucket {a.bucket}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    print(f"{'K':>3s} {'separate: issue ms/it':>22s} {'total ms/it':>12s} {'loop: issue ms/it':>18s} {'total ms/it':>12s}")
    for k in (int(x) for x in a.k.split(",")):
        sep = timed(lambda: separate(k), a.reps)
        lp = timed(lambda: looped(k), a.reps)
        print(f"{k:3d} {sep[0] / k * 1e3:22.2f} {sep[1] / k * 1e3:12.2f} {lp[0] / k * 1e3:18.2f} {lp[1] / k * 1e3:12.2f}",
              flush=True)
    k = max(int(x) for x in a.k.split(","))
    text = loop.lower(runner.params, runner.kv, buf, runner._prev_tokens, k=k).compile().as_text()
    print(f"K={k} loop HLO: known_trip_count {'known_trip_count' in text}")


if __name__ == "__main__":
    main()
