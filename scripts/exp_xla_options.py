"""EXPERIMENT (session 9; run in session 9, results in docs/benchmarks.md "Session 9": no option
moves the decode forward; cuBLAS-only GEMMs make prefill steps 1-2% faster, hence
`step_programs.PREFILL_COMPILER_OPTIONS`): do XLA compile options, given per program
(`jax.jit(compiler_options=)`), make the step's forward faster on the device or its compile
shorter (the cold start)?

    CUDA_VISIBLE_DEVICES=0 PYTHONPATH=. python scripts/exp_xla_options.py --model-shape llama3-8b --set default

One option set per process (XLA keeps autotuning results in memory: a second set in the same
process would find some already tuned). For each token bucket: the forward compiled with the
set's options (seconds), then run back to back on a realistic step (ms per step, median of
`--rounds` rounds of `--reps` calls): up to 256 rows, every row decodes one token at context
`--context` (the engine's decode launch hint above 32 rows); above, prompts of 512 tokens.
Prints a checksum of the hidden states to compare sets (random weights, seed 0).
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
import numpy as np
from benchmark_throughput import SHAPES, shape_dir

SETS = {
    "default": {},
    "autotune2": {"xla_gpu_autotune_level": 2},  # no re-init / correctness check of candidates
    "autotune0": {"xla_gpu_autotune_level": 0},  # heuristics only
    "triton_any": {"xla_gpu_triton_gemm_any": True},
    "exhaustive": {"xla_gpu_exhaustive_tiling_search": True},
    "warp_spec": {"xla_gpu_experimental_enable_triton_warp_specialization": True},
    "all_triton": {"xla_gpu_experimental_all_fusions_with_triton": True},
    "no_triton_gemm": {"xla_gpu_enable_triton_gemm": False},
}


def step_buffer(t: int, context: int, block_size: int, max_blocks: int):
    """Packed step inputs of bucket `t`: decode rows at `context` (t <= 256) or 512-token prompts."""
    from jaxpaged.engine.host_buffer import pack
    from jaxpaged.models.step_input import make_step_input

    rng = np.random.default_rng(0)
    if t <= 256:
        n_seq, new, done = t, 1, context
    else:
        n_seq, new, done = t // 512, 512, 0
    per = -(-(done + new) // block_size)
    seqs = [(rng.integers(0, 1000, new).tolist(), done, list(range(1 + i * per, 1 + (i + 1) * per)))
            for i in range(n_seq)]
    inp = make_step_input(seqs, block_size, t, min(t, 256), max_blocks)
    fields = {f: np.asarray(getattr(inp, f)) for f in ("token_ids", "positions", "slot_mapping", "query_start",
                                                        "seq_lens", "block_tables")}
    buf, layout = pack(fields | {"feedback": np.full(t, -1, np.int32)})
    return buf, layout, n_seq * per + 1


def forward_program(cfg, attention, opts: dict, out_shardings=None):
    """The engine's forward (`step_programs._forward`) jitted with XLA compile options `opts`;
    a new function object per call, so nothing is shared with another program's caches."""
    from jaxpaged.engine.step_programs import _forward

    return jax.jit(functools.partial(_forward, cfg=cfg, attention=attention), donate_argnums=1,
                   static_argnames=("layout", "max_query_len"), compiler_options=opts or None,
                   out_shardings=out_shardings)


def launch_hint(t: int) -> int | None:
    """The engine's `max_query_len` for step_buffer's all-decode buckets above 32 rows."""
    from jaxpaged.kernels.paged_attention_gpu import DECODE_ONLY_MAX_TOKENS

    return DECODE_ONLY_MAX_TOKENS if 32 < t <= 256 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-shape", choices=list(SHAPES), required=True)
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    ap.add_argument("--set", default="default", help=f"option set: one of {', '.join(SETS)}")
    ap.add_argument("--buckets", default="16,256,2048")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cpu-devices", type=int, default=None, help="CPU check: this many fake devices")
    a = ap.parse_args()

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxpaged.kernels import get_attention
    from jaxpaged.models import load_model
    from jaxpaged.models.kv_cache import init_kv_cache
    from jaxpaged.engine.mesh import make_mesh, shard_attention
    from jaxpaged.models.sharding import KV_POOL

    opts = SETS[a.set]
    mesh = make_mesh(a.tensor_parallel_size) if a.tensor_parallel_size > 1 else None
    cfg, params = load_model(str(shape_dir(a.model_shape)), "bfloat16", "dummy", mesh)
    attention = get_attention("auto")
    if mesh is not None:
        attention = shard_attention(attention, mesh)
    rep = NamedSharding(mesh, P()) if mesh is not None else jax.devices()[0]
    kv_sharding = NamedSharding(mesh, KV_POOL) if mesh is not None else None
    block_size, max_blocks = 16, 2048 // 16
    buckets = [int(x) for x in a.buckets.split(",")]
    inputs = {t: step_buffer(t, a.context, block_size, max_blocks) for t in buckets}
    kv = init_kv_cache(cfg, max(n for _, _, n in inputs.values()), block_size, jnp.bfloat16, kv_sharding)
    prev = jax.device_put(np.zeros(256, np.int32), rep)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind} x {a.tensor_parallel_size}, set {a.set} {opts}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    for t in buckets:
        buf, layout, _ = inputs[t]
        mql = launch_hint(t)
        fwd = forward_program(cfg, attention, opts, None if mesh is None else (rep, kv_sharding))
        dbuf = jax.device_put(buf, rep)
        t0 = time.perf_counter()
        try:
            compiled = fwd.lower(params, kv, dbuf, prev, layout=layout, max_query_len=mql).compile()
        except Exception as e:  # an option this XLA does not know, or a failed compile
            print(f"RESULT set={a.set} bucket={t} error={str(e).splitlines()[0][:160]}", flush=True)
            return
        compile_s = time.perf_counter() - t0
        hidden, kv = compiled(params, kv, dbuf, prev)
        h = np.asarray(jax.device_get(hidden), np.float32)
        times = []
        for _ in range(a.rounds):
            jax.block_until_ready(hidden)
            t0 = time.perf_counter()
            for _ in range(a.reps):
                hidden, kv = compiled(params, kv, dbuf, prev)
            jax.block_until_ready(hidden)
            times.append((time.perf_counter() - t0) / a.reps)
        print(f"RESULT set={a.set} bucket={t} compile_s={compile_s:.1f} step_ms={1e3 * statistics.median(times):.3f} "
              f"min_ms={1e3 * min(times):.3f} checksum={np.abs(h).mean():.6f} h00={h[0, 0]:.5f}", flush=True)


if __name__ == "__main__":
    main()
