"""EXPERIMENT: a one-shot all-reduce as a Pallas Mosaic GPU kernel, against XLA's psum, on
the GPUs of one process. Session 7 (docs/parallel.md): exact, 1.1-1.7x psum's wall time per
call. Session 12 (`--profile`): the kernel runs inside XLA's CUDA graph, 7.8 / 14.7 / 58.5 us
at 16 / 256 / 2048 rows on 2 GPUs, but XLA adds a ~4 us barrier kernel and a host-to-device
copy to every call; `--psum-only` times psum alone under the process's XLA_FLAGS.

    CUDA_VISIBLE_DEVICES=0,1 PYTHONPATH=. python scripts/exp_allreduce.py [--rows 16,256,2048] [--hidden 4096] \
        [--psum-only] [--profile]

The question it answers for issue 7 (docs/parallel.md): can the tensor-parallel step's
all-reduces run inside XLA's CUDA graph without NCCL, and in how many microseconds? Today the
8B tp=2 step is split into ~65 graph segments at its all-reduces (host-bound dispatch) and
the 70B tp=4 step spends 160 x 11.8 us in NCCL. The kernel here: every device reads every
peer's input over NVLink (`plgpu.remote_ref`; no NVLink multicast, which must stay off on
these machines) and sums in f32; cross-device semaphores order the reads after the peers'
kernels start and keep each input alive until every peer has read it.

Per shape [rows, hidden] per device (bf16): the max error against psum, the time per call in
a jitted chain of 32 calls (each followed by the same scale), for both; then whether XLA keeps
the kernel inside a command buffer: the optimized HLO of an 8-layer matmul -> all-reduce
chain, entry-computation ops and custom calls outside command buffers
(`profile_step.hlo_report`, which also writes the HLO under `--out`). Lowers for CUDA on a CPU-only machine with
`--lower-only` (a construction check, nothing runs).
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from pathlib import Path

if "--lower-only" in sys.argv:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ceilings import bench  # noqa: E402
from profile_step import hlo_report, summarize, trace  # noqa: E402


def all_reduce_pull(x: jax.Array, *, axis_name: str, num_blocks: int | None = None, tile: int = 8192,
                    vec: int = 8) -> jax.Array:
    """Sum of `x` over `axis_name` (inside shard_map). x: [M, N], M * N a multiple of `tile`."""
    n = lax.axis_size(axis_name)
    shape, dtype = x.shape, x.dtype
    total = math.prod(shape)
    assert total % tile == 0, (shape, tile)
    num_blocks = num_blocks or min(132, total // tile)  # a block per tile up to one per SM

    def kernel(x_ref, y_ref, sems):
        # Per block: sems[0] counts "input ready", sems[1] "done reading"; each wait decrements,
        # so both are back at 0 when the kernel exits (a fast peer's next call can signal early).
        me = lax.axis_index(axis_name)
        xf, yf = x_ref.reshape((total,)), y_ref.reshape((total,))
        for j in range(n):  # this device's input is ready: tell every device (itself included)
            pl.semaphore_signal(sems.at[0], device_id=j)
        pl.semaphore_wait(sems.at[0], n)

        @plgpu.nd_loop((total // tile,), collective_axes="blocks")
        def _tiles(info):
            sl = pl.ds(info.index[0] * tile, tile)
            layout = plgpu.Layout.WG_STRIDED((tile,), vec_size=vec)
            acc = plgpu.layout_cast(xf[sl], layout).astype(jnp.float32)
            for j in range(1, n):
                peer = lax.rem(me + j, n)
                acc = acc + plgpu.layout_cast(plgpu.remote_ref(xf, peer)[sl], layout).astype(jnp.float32)
            yf[sl] = acc.astype(dtype)

        for j in range(n):  # done reading the peers' inputs: they may be reused
            pl.semaphore_signal(sems.at[1], device_id=j)
        pl.semaphore_wait(sems.at[1], n)

        @pl.when(me == -1)  # never runs: as in JAX's all_gather_mgpu, makes XLA place x in symmetric memory
        def _never():
            x_ref[(0,) * len(shape)] = jnp.asarray(0, dtype)

    return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct(shape, dtype), grid=(num_blocks,),
                        grid_names=("blocks",), scratch_types=[plgpu.SemaphoreType.REGULAR((2,))],
                        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
                        )(x)


def chain(mesh, reduce, k: int, weights: bool = False):
    """jit(shard_map) of k (matmul ->) all-reduce -> scale steps; rows sharded over `tp`."""
    n = mesh.shape["tp"]

    def body(x, *ws):
        for i in range(k):
            if weights:
                x = x @ ws[0]
            x = (reduce(x).astype(jnp.float32) * (1.0 / n)).astype(x.dtype)
        return x

    specs = (P("tp"), P()) if weights else (P("tp"),)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P("tp"), check_vma=False))


def psum_line(mesh, x: jax.Array, rows: int, a) -> str:
    """psum alone: max error against the f32 sum of the shards on the host, us per call in a
    chain, and how many all-reduces the compiled chain assigns to NVSHMEM."""
    import numpy as np
    n = mesh.shape["tp"]
    f = chain(mesh, functools.partial(lax.psum, axis_name="tp"), 1)
    shards = np.asarray(x, np.float32).reshape(n, rows, a.hidden)
    want = np.tile(shards.sum(0) / n, (n, 1))
    err = float(np.max(np.abs(np.asarray(f(x), np.float32) - want)))
    many = chain(mesh, functools.partial(lax.psum, axis_name="tp"), a.calls)
    hlo = many.lower(x).compile().as_text()
    sec = bench(many, [(x,)], reps=5, inner=1)
    return (f"rows {rows:5d} x {a.hidden}: psum {sec / a.calls * 1e6:7.1f} us/call, max error vs host sum {err:.3g}, "
            f"NVSHMEM mentions in the compiled chain: {hlo.count('NVSHMEM')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="16,256,2048")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=32)
    ap.add_argument("--lower-only", action="store_true", help="lower for CUDA on this machine, run nothing")
    ap.add_argument("--psum-only", action="store_true",
                    help="time XLA's psum alone (compare XLA_FLAGS collective backends across processes)")
    ap.add_argument("--profile", action="store_true",
                    help="also trace each chain: device time per call by kernel and its CUDA graph")
    ap.add_argument("--out", default="/tmp/jaxpaged-allreduce", help="where the optimized HLO is written")
    a = ap.parse_args()
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("tp",))
    ours = functools.partial(all_reduce_pull, axis_name="tp")
    xla = functools.partial(lax.psum, axis_name="tp")
    print(f"jax {jax.__version__}, {n} x {jax.devices()[0].device_kind}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    for rows in (int(r) for r in a.rows.split(",")):
        shape = (n * rows, a.hidden)
        if a.lower_only:
            spec = jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, P("tp")))
            text = chain(mesh, ours, 2).trace(spec).lower(lowering_platforms=("cuda",)).as_text()
            print(f"rows {rows}: lowered for CUDA, {len(text)} chars, mosaic custom call: {'mosaic_gpu' in text}")
            continue
        x = jax.device_put(jax.random.normal(jax.random.key(rows), shape, jnp.bfloat16), NamedSharding(mesh, P("tp")))
        if a.psum_only:
            print(psum_line(mesh, x, rows, a), flush=True)
            continue
        one = {name: chain(mesh, f, 1) for name, f in (("pallas", ours), ("psum", xla))}
        ref, out = one["psum"](x), one["pallas"](x)
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
        line = f"rows {rows:5d} x {a.hidden}: max |pallas - psum| {err:.3g}"
        for name, f in (("pallas", ours), ("psum", xla)):
            sec = bench(chain(mesh, f, a.calls), [(x,)], reps=5, inner=1)
            line += f"  {name} {sec / a.calls * 1e6:7.1f} us/call"
        print(line, flush=True)
        if a.profile:
            for name, f in (("pallas", ours), ("psum", xla)):
                fn = chain(mesh, f, a.calls)
                jax.block_until_ready(fn(x))  # compile outside the trace
                t0 = time.perf_counter()
                prof = trace(lambda: [jax.block_until_ready(fn(x)) for _ in range(3)], Path(a.out), f"{name}-{rows}")
                summarize(prof, f"{name}, rows {rows} (a step = one call of the chain)", 3 * a.calls,
                          time.perf_counter() - t0, top=6)
    if a.lower_only or a.psum_only:
        return
    w = jax.device_put(jnp.eye(a.hidden, dtype=jnp.bfloat16), NamedSharding(mesh, P()))
    x = jax.device_put(jnp.ones((n * 16, a.hidden), jnp.bfloat16), NamedSharding(mesh, P("tp")))
    for name, f in (("pallas", ours), ("psum", xla)):
        print(f"\n8 x (matmul -> {name}):", flush=True)
        out = Path(a.out) / name
        out.mkdir(parents=True, exist_ok=True)
        hlo_report(chain(mesh, f, 8, weights=True).lower(x, w).compile().as_text(), out)


if __name__ == "__main__":
    main()
