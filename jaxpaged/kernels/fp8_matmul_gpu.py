"""fp8 W8A8 matmul for decode-sized steps on Hopper, as a Pallas Mosaic GPU kernel: the e4m3
weight streams from HBM through a TMA pipeline straight into wgmma's A operand (no conversion
in registers: both operands e4m3, Hopper's fp8 MMA), with the few tokens as its N side
("swap AB": y^T = W x^T), so that a step of 1-64 tokens reads the weight once.

    w:  [N, K]   float8_e4m3fn (the contracted axis minor, as `Fp8Weight.qweight`)
    xq: [Tp, K]  float8_e4m3fn, the tokens quantized and padded to Tp (16, 32 or 64)
    ->  [N, Tp]  float32 sums, unscaled (the caller applies the token and channel scales)

Reference: `w.astype(f32) @ xq.astype(f32).T`.

Grid `(N / block_n, splits)`: a program owns `block_n` output rows (one warpgroup's wgmma M)
and walks `K / splits` input columns, `block_k` at a time, `stages` TMA copies in flight; both
tiles K-major, as an 8-bit wgmma asks. Split-K while the row tiles alone give under two programs
per SM; the parts add in the caller's XLA epilogue. In interpret mode (CPU tests) the token
tile goes through a transposed shared-memory copy: the interpreter's wgmma takes no
transposed operand.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxpaged.kernels.mosaic_interpret import interpret_params
from jaxpaged.kernels.w8a16_matmul_gpu import MAX_TOKENS, padded_tokens, split_k

BLOCK_K = 128  # one 128-byte swizzle row of e4m3


def fp8_matmul_gpu(w: jax.Array, xq: jax.Array, *, block_n: int = 64, block_k: int = BLOCK_K,
                   splits: int | None = None, stages: int = 4, interpret: bool | None = None) -> jax.Array:
    """w [N, K] (e4m3) @ xq [Tp, K].T (e4m3) -> [N, Tp] float32 (module docstring)."""
    n, k = w.shape
    tp = xq.shape[0]
    if n % block_n or k % block_k or tp % 16 or tp > MAX_TOKENS or xq.shape[1] != k:
        raise ValueError(f"fp8 kernel: unsupported shape N={n} K={k} Tp={tp}")
    splits = splits or split_k(n // block_n, k // block_k)
    steps = k // block_k // splits
    if interpret is None:
        interpret = jax.default_backend() != "gpu"

    def body(w_gmem, x_gmem, o_gmem, o_smem, *xt_smem):
        ni, si = lax.axis_index("n"), lax.axis_index("s")

        def step(_, w_smem, x_smem, acc_ref):
            if interpret:
                xt_smem[0][...] = x_smem[...].T
                plgpu.wgmma(acc_ref, w_smem, xt_smem[0])
            else:
                plgpu.wgmma(acc_ref, w_smem, plgpu.transpose_ref(x_smem, (1, 0)))
            plgpu.wgmma_wait(0)

        def acc_scope(acc_ref):
            plgpu.emit_pipeline(
                functools.partial(step, acc_ref=acc_ref), grid=(steps,), max_concurrent_steps=stages,
                in_specs=[plgpu.BlockSpec((block_n, block_k), lambda kb: (ni, si * steps + kb)),
                          plgpu.BlockSpec((tp, block_k), lambda kb: (0, si * steps + kb))])(w_gmem, x_gmem)
            return acc_ref[...]

        o_smem[...] = pl.run_scoped(acc_scope, plgpu.ACC((block_n, tp)))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, pl.ds(ni * block_n, block_n)])
        plgpu.wait_smem_to_gmem(0)

    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((splits, n, tp), jnp.float32), grid=(n // block_n, splits),
        grid_names=("n", "s"), scratch_types=(plgpu.SMEM((block_n, tp), jnp.float32),
                                              *[plgpu.SMEM((block_k, tp), xq.dtype)] * bool(interpret)),
        interpret=interpret_params() if interpret else None,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return jnp.sum(kernel(w, xq), axis=0)


def fp8_matmul_tokens(xq: jax.Array, w: jax.Array, **config) -> jax.Array:
    """xq [T, K] (e4m3, T <= 64) @ w [N, K].T -> [T, N] float32 sums: xq padded to
    `padded_tokens(T)` rows for the kernel, its sums transposed back."""
    t = xq.shape[0]
    return fp8_matmul_gpu(w, jnp.pad(xq, ((0, padded_tokens(t) - t), (0, 0))), **config).T[:t]
