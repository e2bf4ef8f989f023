"""Device ceilings measured in the same run as a benchmark: copy bandwidth and matmul rate.

    PYTHONPATH=. python scripts/ceilings.py      # prints them for this machine's first device
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def bench(fn, arg_sets, *, reps: int = 10, inner: int | None = None, target_s: float = 0.02) -> float:
    """Median seconds per call; each sample is `inner` back-to-back calls over rotating sets
    (so dispatch and sync latency are hidden, as in a serving loop)."""
    for a in arg_sets:  # compile + warm-up
        jax.block_until_ready(fn(*a))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))
    one = time.perf_counter() - t0
    if inner is None:
        inner = int(min(50, max(3, target_s / max(one, 1e-6))))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        r = None
        for i in range(inner):
            r = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(r)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def copy_bandwidth(log=print) -> float:
    """Best of a few elementwise read+write passes over 2-4 GiB (bytes read + written)."""
    n = (1 << 22) if jax.default_backend() == "cpu" else (1 << 30)  # CPU: a smoke run
    best = 0.0
    for dtype, fn, name in [(jnp.bfloat16, lambda x: x * 1.5, "bf16 x*1.5"),
                            (jnp.float32, lambda x: x + 1.0, "f32 x+1"),
                            (jnp.float32, lambda x: -x, "f32 -x")]:
        xs = [jax.random.normal(jax.random.key(i), (n,), dtype) for i in range(2)]
        t = bench(jax.jit(fn), [(x,) for x in xs], reps=10, inner=5)
        bw = 2 * n * jnp.dtype(dtype).itemsize / t
        log(f"  copy {name:<12} {bw / 1e12:.2f} TB/s")
        best = max(best, bw)
        del xs
    return best


def matmul_flops() -> float:
    """bf16 square matmul rate (8192^3 on a GPU)."""
    n = 512 if jax.default_backend() == "cpu" else 8192
    xs = [jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in range(2)]
    return 2 * n**3 / bench(jax.jit(lambda a, b: a @ b), [(xs[0], xs[1]), (xs[1], xs[0])])


def ceilings(log=print) -> dict:
    return {"copy_bytes_per_s": copy_bandwidth(log), "matmul_flops_per_s": matmul_flops()}


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    c = ceilings()
    print(f"{jax.devices()[0].device_kind}: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
          f"bf16 matmul {c['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
