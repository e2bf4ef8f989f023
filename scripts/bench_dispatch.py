"""Host cost of dispatching one jitted call, by number of argument buffers and of kernels.

    python scripts/bench_dispatch.py [--devices 1]

The engine's step dispatch costs milliseconds on the GPU (docs/benchmarks.md). Two models
fit: a cost per argument buffer (the step takes ~230 weight arrays per device for an 8B
model) or per launched kernel (~20 per layer). This times, without waiting for the device:
(a) a call with N tiny array arguments and ~1 kernel, (b) a call with 2 arguments and a
chain of K dependent matmul kernels. Set XLA_FLAGS (e.g. --xla_gpu_enable_command_buffer=)
to compare XLA's CUDA-graph settings. With --devices N the arrays are replicated over N
devices (one mesh axis), as tensor parallelism's are.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def dispatch_ms(fn, args, reps: int = 50) -> float:
    """Median host time of `fn(*args)` returning (not the device's), after a warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t)
        jax.block_until_ready(out)
    return 1e3 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1)
    args = ap.parse_args()
    mesh = Mesh(np.array(jax.devices()[: args.devices]), ("tp",))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P()))  # noqa: E731
    print(f"{jax.devices()[0].device_kind} x {args.devices}, jax {jax.__version__}")
    print(f"{'case':36s} {'dispatch ms':>12s} {'us per unit':>12s}")
    for n in (2, 64, 256, 1024):
        xs = [put(jnp.full((8,), i, jnp.float32)) for i in range(n)]
        fn = jax.jit(lambda *a: sum(a))
        ms = dispatch_ms(fn, xs)
        print(f"{f'{n} argument buffers':36s} {ms:12.3f} {1e3 * ms / n:12.2f}")
    x, w = put(jnp.ones((64, 256), jnp.bfloat16)), put(jnp.ones((256, 256), jnp.bfloat16) / 256)
    for k in (16, 320, 640):
        def chain(x, w, k=k):
            for _ in range(k):
                x = jnp.tanh(x @ w)  # one GEMM and one elementwise kernel per step
            return x

        ms = dispatch_ms(jax.jit(chain), (x, w))
        print(f"{f'{2 * k} kernels (k = {k} matmul + tanh)':36s} {ms:12.3f} {1e3 * ms / (2 * k):12.2f}")


if __name__ == "__main__":
    main()
