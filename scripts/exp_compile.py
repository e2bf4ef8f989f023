"""EXPERIMENT (session 9; run in session 9, docs/benchmarks.md "Session 9": the autotuning of
XLA's Triton GEMM candidates; `llvm_parallel` is unknown to jax 0.11.2's XLA and `nvptx_lib`
fails to compile candidates there): what serialises the warm-up's parallel forward compiles?
Each forward compiles in ~4 s alone, but 13 in a thread pool take 30 s (engine.startup["compiles"]).

    CUDA_VISIBLE_DEVICES=0 PYTHONPATH=. python scripts/exp_compile.py --model-shape llama3-8b --threads 6

Per token bucket, in `--threads` threads at once (1 = one after the other): the seconds of
tracing + lowering (Python, holds the GIL) and of XLA's backend compile, each job's start and
end, and the wall of all. `--set` adds XLA compile options (exp_xla_options.SETS or COMPILE
below). One configuration per process (XLA caches kernels and autotuning in memory).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import time

import jax
import jax.numpy as jnp
import numpy as np
from benchmark_throughput import SHAPES, shape_dir
from exp_xla_options import SETS, forward_program, launch_hint, step_buffer

COMPILE = {
    "llvm_parallel": {"xla_gpu_enable_llvm_module_compilation_parallelism": True},
    "nvptx_lib": {"xla_gpu_enable_libnvptxcompiler": True},
    "no_nvptx_lib": {"xla_gpu_enable_libnvptxcompiler": False},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-shape", choices=list(SHAPES), required=True)
    ap.add_argument("--set", default="default", help=f"one of {', '.join([*SETS, *COMPILE])}")
    ap.add_argument("--buckets", default="16,32,64,128,192,256")
    ap.add_argument("--threads", type=int, default=6)
    a = ap.parse_args()

    from jaxpaged.kernels import get_attention
    from jaxpaged.models import load_model
    from jaxpaged.models.kv_cache import init_kv_cache

    opts = (SETS | COMPILE)[a.set]
    cfg, params = load_model(str(shape_dir(a.model_shape)), "bfloat16", "dummy")
    attention = get_attention("auto")
    buckets = [int(x) for x in a.buckets.split(",")]
    inputs = {t: step_buffer(t, 512, 16, 128) for t in buckets}
    kv = init_kv_cache(cfg, max(n for _, _, n in inputs.values()), 16, jnp.bfloat16)
    prev = jax.device_put(np.zeros(256, np.int32))
    t00 = time.perf_counter()

    def job(t: int):
        buf, layout, _ = inputs[t]
        fwd = forward_program(cfg, attention, opts)
        t0 = time.perf_counter()
        lowered = fwd.lower(params, kv, buf, prev, layout=layout, max_query_len=launch_hint(t))
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        return t, t0 - t00, t1 - t0, t2 - t1, t2 - t00

    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, set {a.set} {opts}, threads {a.threads}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    with concurrent.futures.ThreadPoolExecutor(a.threads) as pool:
        results = list(pool.map(job, buckets))
    wall = time.perf_counter() - t00
    for t, start, low, comp, end in results:
        print(f"  forward {t:5d}: start {start:6.2f}  trace+lower {low:6.2f} s  backend compile {comp:6.2f} s  end {end:6.2f}")
    print(f"RESULT set={a.set} threads={a.threads} jobs={len(buckets)} wall_s={wall:.1f} "
          f"lower_sum_s={sum(r[2] for r in results):.1f} compile_sum_s={sum(r[3] for r in results):.1f}", flush=True)


if __name__ == "__main__":
    main()
