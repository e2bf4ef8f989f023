"""fp8 weight-only matmul (W8A16) as a Pallas kernel (Triton lowering) for small steps on the
GPU: each tile of e4m3 weights streams from HBM at a byte per value and is converted to x's
dtype in registers (Hopper converts e4m3 pairs in one instruction) before a bf16 MMA; x is
not quantized. cuBLASLt's fp8 GEMM, the W8A8 path, is tuned for large M: at decode sizes it
reads its weights well below the copy bandwidth.

    x:       [T, K]        bf16 / f16 / f32
    qweight: float8_e4m3fn [N, K] (the contracted axis minor, `Fp8Weight`'s layout)
    scale:   float32 [N]   one per output channel
    ->       [T, N] in x's dtype

Reference: `Fp8Weight.dequantize()` then a dot (`models/quantization/weights.py`).

Grid `(N / block_n, T / block_t, splits)`: a program owns `block_n` output columns and
`block_t` tokens and walks `K / splits` input rows, `block_k` at a time. Split-K only when the
column tiles alone give too few programs; the parts' float32 sums add in a small XLA
reduction, then the channel scales multiply.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxpaged.kernels.paged_attention_gpu import num_sms


def supported(k: int, n: int, block_k: int = 256) -> bool:
    return k % block_k == 0 and math.gcd(n, 128) >= 16


def _kernel(x_ref, w_ref, o_ref, *, block_t, block_n, block_k, k_per_split):
    j, i, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n0, t0 = j * block_n, i * block_t

    def step(kb, acc):
        k0 = sp * k_per_split + kb * block_k
        x = x_ref[pl.ds(t0, block_t), pl.ds(k0, block_k)]  # [block_t, block_k]
        w = w_ref[pl.ds(n0, block_n), pl.ds(k0, block_k)].astype(x.dtype)  # [block_n, block_k]
        return acc + lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, k_per_split // block_k, step, jnp.zeros((block_t, block_n), jnp.float32))
    o_ref[sp, pl.ds(t0, block_t), pl.ds(n0, block_n)] = acc


def fp8_matmul_gpu(x: jax.Array, qweight: jax.Array, scale: jax.Array, *, block_n: int | None = None,
                   block_k: int = 256, splits: int | None = None, num_warps: int = 4, num_stages: int = 4,
                   interpret: bool | None = None) -> jax.Array:
    """x [T, K] @ (qweight [N, K] * scale [N, None]).T -> [T, N] in x's dtype."""
    t, k = x.shape
    n = qweight.shape[0]
    if not supported(k, n, block_k):
        raise ValueError(f"fp8 kernel: unsupported shape K={k} N={n}")
    block_t = min(64, max(16, 1 << (t - 1).bit_length()))
    block_n = block_n or math.gcd(n, 128)
    tp = -(-t // block_t) * block_t
    programs = (n // block_n) * (tp // block_t)
    if splits is None:  # split K while the programs fill fewer than two waves of the SMs
        splits = 1
        while programs * splits * 2 <= 2 * num_sms() and (k // block_k) % (splits * 2) == 0:
            splits *= 2
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    kern = functools.partial(_kernel, block_t=block_t, block_n=block_n, block_k=block_k, k_per_split=k // splits)
    out = pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((splits, tp, n), jnp.float32),
                         grid=(n // block_n, tp // block_t, splits), interpret=interpret, name="fp8_matmul",
                         compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
                         )(jnp.pad(x, ((0, tp - t), (0, 0))), qweight)
    return (jnp.sum(out, axis=0)[:t] * scale).astype(x.dtype)
