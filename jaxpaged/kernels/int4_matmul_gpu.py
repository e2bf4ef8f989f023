"""W4A16 matmul as a Pallas kernel (Triton lowering) for the GPU: the packed int4 weight streams
from HBM at half a byte per value and is dequantized in registers, tile by tile, before the MMA,
so a decode step reads a quarter of the bf16 bytes (XLA's fusion of the unpack-and-scale into its
GEMM does not happen: it writes the bf16 weight first).

    x:       [T, K]        bf16 / f16 / f32
    qweight: int32 [K/8, N] row 8i + j of the weight in bits 4j..4j+3 of word i (GPTQ's packing)
    scales:  [K/g, N]      one per group of g input rows and output column
    zeros:   uint8 [K/g, N] w = (q - zero) * scale
    ->       [T, N] in x's dtype

Reference: `Int4Weight.dequantize()` then a dot (`models/quantization/kernels.py`).

Grid `(N / block_n, T / block_t, splits)`: a program owns `block_n` output columns and
`block_t` tokens and walks `K / splits` input rows in steps of `block_k` (inside one group, so
one scale and zero row per step). Split-K only when the column tiles alone give too few programs
(decode of a narrow weight); the parts' float32 sums add in a small XLA reduction.
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

INT4_PER_WORD = 8


def supported(k: int, n: int, group: int) -> bool:
    """Shapes the kernel tiles: 16+ columns and input rows per step, in whole words."""
    return math.gcd(n, 128) >= 16 and math.gcd(group, 128) >= 16 and k % group == 0


def _kernel(x_ref, w_ref, s_ref, z_ref, o_ref, *, block_t, block_n, block_k, group, k_per_split):
    j, i, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n0, t0 = j * block_n, i * block_t
    r = lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    word, shift = r // INT4_PER_WORD, (r % INT4_PER_WORD) * 4

    def step(kb, acc):
        k0 = sp * k_per_split + kb * block_k
        x = x_ref[pl.ds(t0, block_t), pl.ds(k0, block_k)]  # [block_t, block_k]
        packed = w_ref[k0 // INT4_PER_WORD + word, pl.ds(n0, block_n)]  # [block_k, block_n]: each word 8x, from cache
        q = (packed >> shift[:, None]) & 0xF
        g = k0 // group
        scale = s_ref[g, pl.ds(n0, block_n)].astype(jnp.float32)
        zero = z_ref[g, pl.ds(n0, block_n)].astype(jnp.int32)
        w = ((q - zero[None, :]).astype(jnp.float32) * scale[None, :]).astype(x.dtype)
        return acc + lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, k_per_split // block_k, step, jnp.zeros((block_t, block_n), jnp.float32))
    o_ref[sp, pl.ds(t0, block_t), pl.ds(n0, block_n)] = acc


def int4_matmul_gpu(x: jax.Array, qweight: jax.Array, scales: jax.Array, zeros: jax.Array, *,
                    block_n: int | None = None, splits: int | None = None, num_warps: int = 4,
                    num_stages: int = 3, interpret: bool | None = None) -> jax.Array:
    """x [T, K] @ the int4 weight [K, N] (module docstring) -> [T, N] in x's dtype."""
    t, k = x.shape
    n = qweight.shape[1]
    group = k // scales.shape[0]
    if not supported(k, n, group):
        raise ValueError(f"int4 kernel: unsupported shape K={k} N={n} group={group}")
    block_t = min(64, max(16, 1 << (t - 1).bit_length()))
    block_k = math.gcd(group, 128)
    block_n = block_n or math.gcd(n, 128)
    tp = -(-t // block_t) * block_t
    programs = (n // block_n) * (tp // block_t)
    if splits is None:  # split K while the programs fill fewer than two waves of the SMs
        splits = 1
        while programs * splits * 2 <= 2 * num_sms() and (k // block_k) % (splits * 2) == 0:
            splits *= 2
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    kern = functools.partial(_kernel, block_t=block_t, block_n=block_n, block_k=block_k, group=group,
                             k_per_split=k // splits)
    out = pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((splits, tp, n), jnp.float32),
                         grid=(n // block_n, tp // block_t, splits), interpret=interpret, name="int4_matmul",
                         compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
                         )(jnp.pad(x, ((0, tp - t), (0, 0))), qweight, scales, zeros)
    return jnp.sum(out, axis=0)[:t].astype(x.dtype)
