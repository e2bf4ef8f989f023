"""Online quantization of a float weight `[in, *out]` at load time (`quantization="fp8"`,
`"int8"`, `"int4"` on a float checkpoint), and random weights (`load_format=dummy`) quantized
in a checkpoint's scheme: round to nearest, scales from each output channel's (group's, block's)
range."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxpaged.kernels.fp8_quant import FP8_MAX, MIN_SCALE, to_fp8
from jaxpaged.models.config import ConfigError
from jaxpaged.models.quantization.packing import pack_int4
from jaxpaged.models.quantization.weights import (Fp8BlockWeight, Fp8Weight, Int4Weight, Int8W8A8Weight,
                                                  Int8Weight, QuantizedWeight)

INT4_GROUP_SIZE = 128


def _channel_amax(w: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.max(jnp.abs(w.astype(jnp.float32)), axis=0), MIN_SCALE)


def quantize_fp8(w: jax.Array) -> Fp8Weight:
    """e4m3 per output channel (dynamic per-token activations at run time)."""
    scale = _channel_amax(w) / FP8_MAX
    q = to_fp8(w.astype(jnp.float32), scale)
    return Fp8Weight(jnp.moveaxis(q, 0, -1), scale)


def quantize_fp8_block(w: jax.Array, block: int) -> Fp8BlockWeight:
    """e4m3 in blocks of `block` x `block` (output channels x input rows), one scale per block."""
    n, out = w.shape[0], w.shape[1:]
    flat = w.astype(jnp.float32).reshape(n, -1).T  # [O, in]
    o = flat.shape[0]
    padded = jnp.pad(flat, ((0, -o % block), (0, -n % block)))
    blocks = padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block, block)
    scale = jnp.maximum(jnp.max(jnp.abs(blocks), axis=(1, 3)), MIN_SCALE) / FP8_MAX  # [O / block, G]
    rows = jnp.repeat(scale, block, axis=0)[:o]  # [O, G]: each output channel its block's
    q = to_fp8(flat, jnp.repeat(rows, block, axis=1)[:, :n])
    return Fp8BlockWeight(q.reshape(*out, n), rows.reshape(*out, -1), block)


def quantize_int8(w: jax.Array, group_size: int = 0) -> Int8Weight:
    """Symmetric int8, values -127..127, per output channel (or per group of `group_size` input rows)."""
    n, out = w.shape[0], w.shape[1:]
    g = group_size or n
    grouped = w.astype(jnp.float32).reshape(n // g, g, *out)
    scale = jnp.maximum(jnp.max(jnp.abs(grouped), axis=1), MIN_SCALE) / 127.0  # [n / g, *out]
    q = jnp.clip(jnp.round(grouped / scale[:, None]), -127, 127).astype(jnp.int8).reshape(n, *out)
    return Int8Weight(q, scale if group_size else scale[0])


def int4_group_size(num_inputs: int) -> int:
    """128, or the largest divisor of `num_inputs` that divides 128 (576 -> 64)."""
    return math.gcd(num_inputs, INT4_GROUP_SIZE)


def quantize_int4(w: jax.Array, group_size: int = 0) -> Int4Weight:
    """Asymmetric int4 in groups of `group_size` input rows (-1: all of them; 0: `int4_group_size`):
    per group and output channel, the range [min, max] (widened to hold 0) maps onto 0..15."""
    n, out = w.shape[0], w.shape[1:]
    g = n if group_size == -1 else group_size or int4_group_size(n)
    if n % g:
        raise ConfigError(f"int4 group size {g} does not divide a weight's {n} input rows")
    grouped = w.astype(jnp.float32).reshape(n // g, g, *out)
    lo = jnp.minimum(jnp.min(grouped, axis=1), 0.0)
    hi = jnp.maximum(jnp.max(grouped, axis=1), 0.0)
    scale = jnp.maximum(hi - lo, MIN_SCALE) / 15.0
    zero = jnp.clip(jnp.round(-lo / scale), 0, 15)
    q = jnp.clip(jnp.round(grouped / scale[:, None]) + zero[:, None], 0, 15).reshape(n, *out)
    return Int4Weight(pack_int4(q), scale, zero.astype(jnp.uint8))


@functools.partial(jax.jit, static_argnames=("scheme", "group_size"))
def quantize(w: jax.Array, scheme: str, group_size: int = 0) -> QuantizedWeight:
    """`w` [in, *out] as a quantized leaf of `scheme` (`QuantizationConfig.scheme`: fp8, fp8_block
    in blocks of `group_size`, int8 per channel or in groups of `group_size`, int8_w8a8, int4 in
    groups of `group_size`); one compiled program per weight shape."""
    if scheme == "int4":
        return quantize_int4(w, group_size)
    if scheme == "fp8_block":
        return quantize_fp8_block(w, group_size)
    if scheme == "int8_w8a8":
        leaf = quantize_int8(w)
        return Int8W8A8Weight(leaf.qweight, leaf.scale)
    return {"fp8": quantize_fp8, "int8": functools.partial(quantize_int8, group_size=group_size)}[scheme](w)
