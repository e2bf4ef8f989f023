"""Per-token e4m3 quantization of fp8 W8A8's GEMM inputs, in jnp: the reference of the row
kernels in `fp8_quant_gpu.py`, and the path everywhere they do not run.

    quantize_rows_ref:  x [T, W] (rms_norm(x) with `norm_weight` [W]) -> (e4m3 [T, W], scale [T, 1] float32)
    silu_mul_quant_ref: sums [T, 2, W] (gate, up) times their scales  -> (e4m3 [T, W], scale [T, 1] float32)

A row's value is rounded to the model's dtype before it is quantized (what the unquantized
model's norm or GEMM output holds); its scale is its largest magnitude (capped at `scale_ub`
where the checkpoint sets one) over 448, the e4m3 maximum.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
MIN_SCALE = 1e-12  # an all-zero row quantizes to zeros, not NaNs


def fp8_scale(amax: jax.Array, ub: jax.Array | None) -> jax.Array:
    """A row's scale from its largest magnitude (capped at `ub`)."""
    if ub is not None:
        amax = jnp.minimum(amax, ub)
    return jnp.maximum(amax, MIN_SCALE) / FP8_MAX


def to_fp8(y: jax.Array, scale: jax.Array) -> jax.Array:
    return jnp.clip(y / scale, -FP8_MAX, FP8_MAX).astype(FP8)


def quantized(y: jax.Array, ub: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """y [..., W] float32 -> (e4m3 [..., W], scale [..., 1]) per row."""
    scale = fp8_scale(jnp.max(jnp.abs(y), axis=-1, keepdims=True), ub)
    return to_fp8(y, scale), scale


def round_to(y: jax.Array, dtype) -> jax.Array:
    return y.astype(dtype).astype(jnp.float32)


def rms_normed(x: jax.Array, w: jax.Array, eps: float, width: int) -> jax.Array:
    """x [..., Wp] float32 (zeros past `width`), w [Wp] -> x * rsqrt(mean(x^2) + eps) * w."""
    return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) / width + eps) * w


def silu_mul(g: jax.Array, u: jax.Array, dtype) -> jax.Array:
    g, u = round_to(g, dtype), round_to(u, dtype)
    return round_to(g * jax.nn.sigmoid(g) * u, dtype)


def quantize_rows_ref(x: jax.Array, norm_weight: jax.Array | None = None, eps: float = 1e-6,
                      scale_ub: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    y = x.astype(jnp.float32)
    if norm_weight is not None:
        y = round_to(rms_normed(y, norm_weight.astype(jnp.float32), eps, x.shape[-1]), x.dtype)
    return quantized(y, scale_ub)


def silu_mul_quant_ref(sums: jax.Array, row_scale: jax.Array, col_scale: jax.Array, dtype,
                       scale_ub: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    y = sums.astype(jnp.float32) * row_scale[:, :, None] * col_scale
    return quantized(silu_mul(y[:, 0], y[:, 1], dtype), scale_ub)
