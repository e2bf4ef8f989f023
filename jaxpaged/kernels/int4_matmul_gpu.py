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
`block_t` tokens and walks `K / splits` input rows, 128 at a time, with one contiguous
[16, block_n] load of packed words per step, whose 8 nibble planes are rows 8w + j for plane
j. Each plane takes its own MMA against the matching 16 columns of x, permuted outside the
kernel (`_plane_order`), so the words need no transpose or join. With groups of 128+ rows a
plane is `q - zero` (exact small integers made from the bits without int-to-float
conversions, `_biased`) and the step's scale multiplies its sums; smaller groups scale each
element. Split-K only when the column tiles alone give too few programs (decode of a narrow
weight); the parts' float32 sums add in a small XLA reduction.

One token with groups of 128+ (batch-1 decode) takes `_matvec_kernel` instead: no MMA (15 of its
16 rows would be padding), each plane is `16 + q` in float32 made by one shift and one
and-or of the bits, and one FMA per weight adds x times it into a [16, block_n] float32 sum;
the zero's part, `(16 + zero) * scale * sum(x)` per group, is taken off once per step. The
next step's words are loaded before this step's arithmetic.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxpaged.kernels.attention_tiles import num_sms

INT4_PER_WORD = 8
BLOCK_K = 128  # input rows per step: 16 packed words per column
WORDS = BLOCK_K // INT4_PER_WORD
# (columns, warps) per program at 16 tokens with groups of 128+: 1.22x the earlier joined-planes
# kernel's best tile there on an H100 (docs/decisions.md); larger steps and smaller groups keep
# (gcd(N, 128), 4)
DECODE_TILE = (64, 4)
MATVEC_TILE = (256, 16)  # (columns, warps) per program of the one-token kernel


def supported(k: int, n: int, group: int) -> bool:
    """Shapes the kernel tiles: 16+ columns, whole 128-row steps, groups of whole words that
    divide a step or are whole steps."""
    return (math.gcd(n, 128) >= 16 and k % BLOCK_K == 0 and k % group == 0 and group % INT4_PER_WORD == 0
            and (BLOCK_K % group == 0 or group % BLOCK_K == 0))


def takes_matvec(tokens: int, group: int) -> bool:
    """Steps that take `_matvec_kernel` by default: one token, groups of 128+ rows."""
    return tokens == 1 and group >= BLOCK_K


def _plane_order(x: jax.Array) -> jax.Array:
    """x [T, K] with each 128-column block reordered from row 8w + j to 16j + w: plane j's 16
    inputs contiguous."""
    t, k = x.shape
    return x.reshape(t, k // BLOCK_K, WORDS, INT4_PER_WORD).swapaxes(2, 3).reshape(t, k)


# bits that make a nibble n (0..15) the float base + n when OR'd in: its mantissa's low bits
_MAGIC = {"bfloat16": (0x4300, jnp.int16), "float16": (0x6400, jnp.int16), "float32": (0x4B000000, jnp.int32)}


def _biased(nibbles: jax.Array, dtype) -> jax.Array:
    """int32 values 0..15 as `dtype` floats base + n (128 in bf16, 1024 in f16, 2^23 in f32) by
    bits alone: the GPU's int-to-float conversions run at a quarter of its float rate or less."""
    bits, int_type = _MAGIC[jnp.dtype(dtype).name]
    return lax.bitcast_convert_type((nibbles | bits).astype(int_type), dtype)


def _plane_kernel(x_ref, w_ref, s_ref, z_ref, o_ref, *, block_t, block_n, group, k_per_split):
    """One MMA per nibble plane against x's matching 16 columns (x permuted: `_plane_order`).
    Groups of 128+ rows: planes of `q - zero` in x's dtype, the step's scale on its sums;
    smaller groups: each word row's scale and zero applied to its elements."""
    j, i, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n0, t0 = j * block_n, i * block_t
    dot = functools.partial(lax.dot_general, dimension_numbers=(((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)

    def planes(k0: jax.Array, plane_weights) -> jax.Array:
        """sum over the step's planes of x's 16 columns @ plane_weights(plane) [16, block_n]."""
        part = jnp.zeros((block_t, block_n), jnp.float32)
        for plane in range(INT4_PER_WORD):  # rows 8w + plane of the step
            part += dot(x_ref[pl.ds(t0, block_t), pl.ds(k0 + plane * WORDS, WORDS)], plane_weights(plane))
        return part

    def step(kb, acc):
        k0 = sp * k_per_split + kb * BLOCK_K
        packed = w_ref[pl.ds(k0 // INT4_PER_WORD, WORDS), pl.ds(n0, block_n)]  # [16, block_n]
        nibbles = lambda plane: (packed >> (4 * plane)) & 0xF  # noqa: E731
        if group >= BLOCK_K:  # one group per step: its scale on the step's sums
            g = pl.ds(k0 // group, 1)
            zero = _biased(z_ref[g, pl.ds(n0, block_n)].astype(jnp.int32), x_ref.dtype)  # [1, block_n]
            scale = s_ref[g, pl.ds(n0, block_n)].astype(jnp.float32)
            return acc + planes(k0, lambda plane: _biased(nibbles(plane), x_ref.dtype) - zero) * scale
        word_group = lax.broadcasted_iota(jnp.int32, (WORDS,), 0) * INT4_PER_WORD // group
        g = k0 // group + word_group  # each word row's group: [16, block_n] scales and zeros
        scale = s_ref[g, pl.ds(n0, block_n)].astype(jnp.float32)
        zero_scaled = z_ref[g, pl.ds(n0, block_n)].astype(jnp.float32) * scale
        return acc + planes(k0, lambda plane: (nibbles(plane).astype(jnp.float32) * scale - zero_scaled
                                               ).astype(x_ref.dtype))  # (q - zero) * scale

    acc = lax.fori_loop(0, k_per_split // BLOCK_K, step, jnp.zeros((block_t, block_n), jnp.float32))
    o_ref[sp, pl.ds(t0, block_t), pl.ds(n0, block_n)] = acc


def _plus16(packed: jax.Array, plane: int) -> jax.Array:
    """Nibble `plane` of each int32 word as the float32 16 + q: shifted to bits 19..22 (the
    mantissa's ulp is 2^-19 at 16) and OR'd into 16.0's bits."""
    shift = 19 - 4 * plane
    bits = packed << shift if shift >= 0 else lax.shift_right_logical(packed, jnp.int32(-shift))
    return lax.bitcast_convert_type((bits & 0x00780000) | 0x41800000, jnp.float32)


def _matvec_kernel(x_ref, w_ref, s_ref, z_ref, o_ref, *, block_n, group, k_per_split, prefetch):
    """One token (x [K] float32 in plane order), groups of 128+: sum over steps of
    scale * (x . (16 + q) - (16 + zero) * sum(x)), the dot as FMAs into [16, block_n]. The
    next `prefetch` steps' words are loaded before this step's FMAs (Triton pipelines only
    loads that feed a dot), so their latency hides under the arithmetic."""
    j, sp = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(j * block_n, block_n)
    steps = k_per_split // BLOCK_K
    load = lambda kb: w_ref[pl.ds((sp * k_per_split + kb * BLOCK_K) // INT4_PER_WORD, WORDS), cols]  # noqa: E731

    def step(kb, carry):
        acc, acc_zero, ahead = carry  # ahead: the words [16, block_n] of steps kb .. kb + prefetch - 1
        packed = ahead[0]
        ahead = (*ahead[1:], load(jnp.minimum(kb + prefetch, steps - 1)))
        k0 = sp * k_per_split + kb * BLOCK_K
        part = jnp.zeros((WORDS, block_n), jnp.float32)
        for plane in range(INT4_PER_WORD):
            part += x_ref[pl.ds(k0 + plane * WORDS, WORDS)][:, None] * _plus16(packed, plane)
        g = pl.ds(k0 // group, 1)
        scale = s_ref[g, cols].astype(jnp.float32)  # [1, block_n]
        x_sum = jnp.sum(x_ref[pl.ds(k0, BLOCK_K)])
        return (acc + part * scale, acc_zero + (z_ref[g, cols].astype(jnp.float32) + 16.0) * scale * x_sum,
                ahead)

    ahead = tuple(load(min(i, steps - 1)) for i in range(prefetch))
    acc, acc_zero, _ = lax.fori_loop(0, steps, step, (jnp.zeros((WORDS, block_n), jnp.float32),
                                                      jnp.zeros((1, block_n), jnp.float32), ahead))
    o_ref[sp, :, cols] = jnp.sum(acc, axis=0, keepdims=True) - acc_zero


def int4_matmul_gpu(x: jax.Array, qweight: jax.Array, scales: jax.Array, zeros: jax.Array, *,
                    block_n: int | None = None, splits: int | None = None, num_warps: int | None = None,
                    num_stages: int = 3, matvec: bool | None = None, prefetch: int | None = None,
                    interpret: bool | None = None) -> jax.Array:
    """x [T, K] @ the int4 weight [K, N] (module docstring) -> [T, N] in x's dtype. Decode-sized
    steps (16 tokens) with groups of 128+ default to `DECODE_TILE` per program; `matvec` (None:
    one token with groups of 128+) takes `_matvec_kernel`, `MATVEC_TILE` per program, its words
    loaded `prefetch` (None: 1) steps ahead; the other form takes no `prefetch`."""
    t, k = x.shape
    n = qweight.shape[1]
    group = k // scales.shape[0]
    if not supported(k, n, group):
        raise ValueError(f"int4 kernel: unsupported shape K={k} N={n} group={group}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if matvec if matvec is not None else takes_matvec(t, group):
        return _matvec(x, qweight, scales, zeros, block_n or MATVEC_TILE[0], splits, num_warps or MATVEC_TILE[1],
                       num_stages, 1 if prefetch is None else prefetch, interpret)
    if prefetch is not None:
        raise ValueError(f"int4 kernel: prefetch={prefetch} applies to the one-token form only (matvec), "
                         f"not to this {t}-token step")
    block_t = min(64, max(16, 1 << (t - 1).bit_length()))
    decode = group >= BLOCK_K and block_t == 16 and n % DECODE_TILE[0] == 0  # (measured there)
    block_n = block_n or (DECODE_TILE[0] if decode else math.gcd(n, 128))
    num_warps = num_warps or (DECODE_TILE[1] if decode else 4)
    tp = -(-t // block_t) * block_t
    splits = splits or _splits((n // block_n) * (tp // block_t), k)
    kern = functools.partial(_plane_kernel, block_t=block_t, block_n=block_n, group=group, k_per_split=k // splits)
    out = pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((splits, tp, n), jnp.float32),
                         grid=(n // block_n, tp // block_t, splits), interpret=interpret, name="int4_matmul",
                         compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
                         )(jnp.pad(_plane_order(x), ((0, tp - t), (0, 0))), qweight, scales, zeros)
    return jnp.sum(out, axis=0)[:t].astype(x.dtype)


def _splits(programs: int, k: int) -> int:
    """Split K while the programs fill fewer than two waves of the SMs."""
    splits = 1
    while programs * splits * 2 <= 2 * num_sms() and (k // BLOCK_K) % (splits * 2) == 0:
        splits *= 2
    return splits


def _matvec(x, qweight, scales, zeros, block_n, splits, num_warps, num_stages, prefetch, interpret):
    """`_matvec_kernel` over x [1, K] -> [1, N] in x's dtype."""
    t, k = x.shape
    if t != 1:
        raise ValueError(f"int4 one-token kernel: {t} tokens")
    n = qweight.shape[1]
    block_n = math.gcd(n, block_n)
    splits = splits or _splits(n // block_n, k)
    kern = functools.partial(_matvec_kernel, block_n=block_n, group=k // scales.shape[0], k_per_split=k // splits,
                             prefetch=prefetch)
    call = pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((splits, 1, n), jnp.float32),
                          grid=(n // block_n, splits), interpret=interpret, name="int4_matvec",
                          compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages))
    out = call(_plane_order(x).astype(jnp.float32).reshape(k), qweight, scales, zeros)
    return jnp.sum(out, axis=0).astype(x.dtype)
