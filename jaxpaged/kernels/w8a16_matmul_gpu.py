"""Quantized-weight matmul (fp8, int8, int4) for decode-sized steps on Hopper, as a Pallas
Mosaic GPU kernel: the weight streams from HBM through a TMA pipeline at one byte per value
(int4: half a byte) and is converted to bf16 (fp8: f16, the one conversion Hopper has) in
registers as wgmma's A operand, with the few tokens as its N side ("swap AB": y^T = W x^T), so
that a step of 1-64 tokens reads the weight once.

    w:  [N, K]   float8_e4m3fn, int8 or int4 (the contracted axis minor, as `Fp8Weight.qweight`)
    xt: [K, Tp]  bf16, x transposed and padded to Tp tokens (16, 32 or 64; f16 for fp8 weights)
    scales, zeros: [K / g, N] for int4 (w = (q - zero) * scale), else None
    ->  [N, Tp]  float32 sums (8-bit weights: unscaled, the caller applies its channel scale)

Reference: `w.astype(f32) @ xt.astype(f32)`.

Grid `(N / block_n, splits)`: a program owns `block_n` output rows (one warpgroup's wgmma M)
and walks `K / splits` input columns, `block_k` at a time, `stages` TMA copies in flight.
Split-K while the row tiles alone give under two programs per SM; the parts' float32 sums add
in the caller's XLA epilogue. In interpret mode (CPU tests) the converted tile goes through a
shared-memory scratch, because the interpreter's wgmma reads its operands from references only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxpaged.kernels.attention_tiles import num_sms
from jaxpaged.kernels.mosaic_interpret import interpret_params, layout_cast

MAX_TOKENS = 64  # wgmma's N side; beyond, the step is no longer weight-bound (cuBLASLt's GEMM)
BLOCK_K = 128


def padded_tokens(t: int) -> int:
    """The Tp a step of t tokens runs at: 16, 32 or 64 (a bf16 tile of xt needs 16 columns)."""
    return max(16, 1 << (t - 1).bit_length())


def split_k(row_tiles: int, k_steps: int) -> int:
    """Parts of K, a power of two dividing the steps, while the row tiles give under two programs
    per SM."""
    splits = 1
    while row_tiles * splits < 2 * num_sms() and k_steps % (splits * 2) == 0:
        splits *= 2
    return splits


def supported(n: int, k: int, t: int) -> bool:
    return t <= MAX_TOKENS and n % 64 == 0 and k % BLOCK_K == 0


def w8a16_matmul_gpu(w: jax.Array, xt: jax.Array, scales: jax.Array | None = None, zeros: jax.Array | None = None,
                     *, block_n: int = 64, block_k: int = BLOCK_K, splits: int | None = None, stages: int = 4,
                     scale_acc: bool = True, interpret: bool | None = None) -> jax.Array:
    """w [N, K] @ xt [K, Tp] (bf16) -> [N, Tp] float32 (module docstring). An int4 `w` (signed)
    takes `scales` (any float dtype; bf16 for scaled tiles) and `zeros` (bf16) [K / g, N],
    groups of g input columns, w = (q - zero) * scale: with `scale_acc` (g a multiple of
    `block_k`), each step's MMA of q goes to its own accumulator, which adds
    `scale * (sums - zero * sum(x))` to the total; else each group's part of a step's tile (g a
    multiple or a divisor of `block_k`) is `(q - zero) * scale` in bf16 before its MMA."""
    n, k = w.shape
    tp = xt.shape[1]
    if n % block_n or k % block_k or tp % 16 or tp > MAX_TOKENS:
        raise ValueError(f"w8a16 kernel: unsupported shape N={n} K={k} Tp={tp}")
    grouped = scales is not None
    group = k // scales.shape[0] if grouped else k
    by_acc = grouped and scale_acc
    if group % block_k and (by_acc or block_k % group):
        raise ValueError(f"w8a16 kernel: groups of {group} input columns do not fit {block_k}-column steps")
    sub = min(group, block_k)  # the columns of one MMA: a group's part of a step
    splits = splits or split_k(n // block_n, k // block_k)
    steps = k // block_k // splits
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if jnp.dtype(w.dtype).itemsize == 1 and jnp.issubdtype(w.dtype, jnp.floating):
        xt = xt.astype(jnp.float16)  # Hopper converts e4m3 to f16 only: the tiles and x in f16
    extras = (scales, zeros) if grouped else ()
    xsum_cols = max(tp, 32)  # each step's sum of x per token, in a TMA slot of 128+ bytes (its alignment)
    if by_acc:
        extras += (jnp.pad(jnp.sum(xt.reshape(k // block_k, block_k, tp), axis=1, dtype=jnp.float32),
                           ((0, 0), (0, xsum_cols - tp))),)
    row = lambda v: layout_cast(v, plgpu.Layout.WGMMA.reduce(1), interpret)  # noqa: E731
    col = lambda v: layout_cast(v, plgpu.Layout.WGMMA.reduce(0), interpret)  # noqa: E731

    def body(*refs):
        w_gmem, x_gmem, *extra_gmem, o_gmem = refs[:3 + len(extras)]
        scratch = refs[3 + len(extras):]
        ni, si = lax.axis_index("n"), lax.axis_index("s")
        k_block = lambda kb: si * steps + kb  # noqa: E731

        def mma(acc_ref, w_smem, x_smem, scale_smem=None, zero_smem=None):
            """acc += the step's tile @ its x rows; with scales, one MMA per group in the step."""
            width = block_k if scale_smem is None else sub
            for g in range(block_k // width):
                cols = pl.ds(g * width, width)
                a = w_smem[:, cols].astype(xt.dtype)
                if scale_smem is not None:
                    scale, zero = row(scale_smem[g]), row(zero_smem[g])
                    bcast = lambda v: lax.broadcast_in_dim(v.astype(a.dtype), a.shape, [0])  # noqa: E731
                    a = (a - bcast(zero)) * bcast(scale)
                if interpret:  # the interpreter's wgmma reads references only
                    scratch[0][...] = a
                    plgpu.commit_smem()
                    a = scratch[0]
                plgpu.wgmma(acc_ref, a, x_smem.at[cols])
                plgpu.wgmma_wait(0)

        def by_acc_step(_, w_smem, x_smem, scale_smem, zero_smem, xsum_smem, total):
            def part_scope(part_ref):
                mma(part_ref, w_smem, x_smem)
                return part_ref[...]

            part = pl.run_scoped(part_scope, plgpu.ACC((block_n, tp)))
            scale, zero = (row(r[...].astype(jnp.float32)) for r in (scale_smem, zero_smem))
            xsum = col(xsum_smem[pl.ds(0, tp)])
            part = part - lax.broadcast_in_dim(zero, part.shape, [0]) * lax.broadcast_in_dim(xsum, part.shape, [1])
            return total + lax.broadcast_in_dim(scale, part.shape, [0]) * part

        if by_acc:  # a step's one group
            group_specs = [plgpu.BlockSpec((None, block_n), lambda kb: (k_block(kb) * block_k // group, ni))] * 2
        else:  # the step's groups, or the one it lies in
            group_specs = [plgpu.BlockSpec((block_k // sub, block_n),
                                           lambda kb: (k_block(kb) * sub // group, ni))] * (2 * grouped)
        xsum_specs = [plgpu.BlockSpec((None, xsum_cols), lambda kb: (k_block(kb), 0))] * by_acc
        pipeline = functools.partial(
            plgpu.emit_pipeline, grid=(steps,), max_concurrent_steps=stages,
            in_specs=[plgpu.BlockSpec((block_n, block_k), lambda kb: (ni, k_block(kb))),
                      plgpu.BlockSpec((block_k, tp), lambda kb: (k_block(kb), 0)), *group_specs, *xsum_specs])
        if by_acc:
            zero = jnp.zeros((block_n, tp), jnp.float32)
            acc = pipeline(by_acc_step, init_carry=layout_cast(zero, plgpu.Layout.WGMMA, interpret))(
                w_gmem, x_gmem, *extra_gmem)
        else:
            def acc_scope(acc_ref):
                pipeline(lambda _, w_smem, x_smem, *group_smem: mma(acc_ref, w_smem, x_smem, *group_smem))(
                    w_gmem, x_gmem, *extra_gmem)
                return acc_ref[...]

            acc = pl.run_scoped(acc_scope, plgpu.ACC((block_n, tp)))

        @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((block_n, tp), jnp.float32))
        def _store(o_smem):
            o_smem[...] = acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, pl.ds(ni * block_n, block_n)])
            plgpu.wait_smem_to_gmem(0)

    scratch = (plgpu.SMEM((block_n, sub if grouped else block_k), xt.dtype),) if interpret else ()
    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((splits, n, tp), jnp.float32), grid=(n // block_n, splits),
        grid_names=("n", "s"), scratch_types=scratch, interpret=interpret_params() if interpret else None,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return jnp.sum(kernel(w, xt, *extras), axis=0)


def w8a16_matmul_tokens(x: jax.Array, w: jax.Array, scales: jax.Array | None = None, zeros: jax.Array | None = None,
                        **config) -> jax.Array:
    """x [T, K] (T <= 64) @ w [N, K] -> [T, N] float32: x padded to `padded_tokens(T)` and
    transposed for the kernel, its sums transposed back."""
    t = x.shape[0]
    xt = jnp.pad(x.astype(jnp.bfloat16), ((0, padded_tokens(t) - t), (0, 0))).T
    return w8a16_matmul_gpu(w, xt, scales, zeros, **config).T[:t]
