"""Per-token e4m3 quantization of fp8 W8A8's GEMM inputs, fused with the op that makes them, as
Pallas row kernels (Triton lowering) for the GPU. XLA makes a quantized input in two or three
launches (the op, the row's largest magnitude, the conversion), each reading the row again; a
row kernel holds the row in registers and writes the e4m3 values and the scale once.

    quantize_rows:  x [T, W]                      -> (e4m3 [T, W], scale [T, 1] float32)
      with `norm_weight` [W]: rms_norm(x) first (the norm before q/k/v and before gate/up)
    silu_mul_quant: sums [T, 2, W] (gate, up)     -> (e4m3 [T, W], scale [T, 1] float32)
      sums: the gate/up fp8 GEMM's float32 sums, times `row_scale` [T, 1] and `col_scale` [2, W]

References (and the path where these do not run): `fp8_quant.py`, whose rounding and scale
rules the kernels share.

quantize_rows: grid `(T,)`, one program per row, the row padded to a power of two (masked
columns read 0). silu_mul_quant: grid `(T / rows,)`, each program's rows read in column chunks
(`silu_launch`): a whole [2, 14336] float32 row at once would not fit the registers.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxpaged.kernels.attention_tiles import next_pow2
from jaxpaged.kernels.fp8_quant import FP8, fp8_scale, quantized, rms_normed, round_to, silu_mul, to_fp8


def _load(ref, mask):
    """A masked load reads 0 where the mask is off; mask None: a whole block, no mask."""
    return pltriton.load(ref, mask=mask, other=None if mask is None else 0.0)


def _quantize_kernel(*refs, width, block, eps, norm, has_ub):
    x_ref, refs = refs[0], refs[1:]
    w_ref, refs = (refs[0], refs[1:]) if norm else (None, refs)
    ub_ref = refs[0] if has_ub else None
    q_ref, s_ref = refs[-2:]
    t = pl.program_id(0)
    cols = lax.broadcasted_iota(jnp.int32, (block,), 0)
    ok = None if width == block else cols < width
    x = _load(x_ref.at[(jnp.full_like(cols, t), cols)], ok)
    y = x.astype(jnp.float32)
    if norm:
        w = _load(w_ref.at[cols], ok).astype(jnp.float32)
        y = round_to(rms_normed(y, w, eps, width), x_ref.dtype)
    q, scale = quantized(y, None if ub_ref is None else ub_ref[0])
    pltriton.store(q_ref.at[(jnp.full_like(cols, t), cols)], q, mask=ok)
    s_ref[pl.ds(t, 1)] = scale


def _silu_mul_kernel(*refs, t, width, rows, cols, dtype, has_ub):
    """`rows` rows per program, read once in `cols`-wide chunks (a Python loop: each chunk's
    values stay in registers, in the model's dtype, until the rows' scales are known). Only
    one chunk's float32 sums and channel scales are live at a time, not four whole rows."""
    y_ref, rs_ref, cs_ref = refs[:3]
    ub_ref = refs[3] if has_ub else None
    q_ref, s_ref = refs[-2:]
    exact = t % rows == 0 and width % cols == 0  # every block in bounds: no masks (vector loads)
    r = pl.program_id(0) * rows + lax.broadcasted_iota(jnp.int32, (rows,), 0)
    row_ok = None if exact else r < t
    row_scale = _load(rs_ref.at[r], row_ok)[:, None]
    chunks, amax = [], jnp.zeros((rows,), jnp.float32)
    for j in range(pl.cdiv(width, cols)):
        c = j * cols + lax.broadcasted_iota(jnp.int32, (cols,), 0)
        idx = jnp.broadcast_to(r[:, None], (rows, cols)), jnp.broadcast_to(c[None, :], (rows, cols))
        col_ok = None if exact else c < width
        ok = None if exact else row_ok[:, None] & col_ok[None, :]

        def part(i):
            sums = _load(y_ref.at[(idx[0], jnp.full_like(idx[1], i), idx[1])], ok)
            cs = _load(cs_ref.at[(jnp.full_like(c, i), c)], col_ok)
            return sums.astype(jnp.float32) * row_scale * cs[None, :]

        y = silu_mul(part(0), part(1), dtype)
        amax = jnp.maximum(amax, jnp.max(jnp.abs(y), axis=1))
        chunks.append((idx, ok, y.astype(dtype)))
    scale = fp8_scale(amax, None if ub_ref is None else ub_ref[0])
    for idx, ok, y in chunks:
        pltriton.store(q_ref.at[idx], to_fp8(y.astype(jnp.float32), scale[:, None]), mask=ok)
    pltriton.store(s_ref.at[r], scale, mask=row_ok)


def _call(kernel, name: str, args, t: int, width: int, grid: int, num_warps: int, interpret: bool | None):
    """The row kernel's launch: e4m3 [T, W] and a float32 scale per row out."""
    q, scale = pl.pallas_call(
        kernel, out_shape=[jax.ShapeDtypeStruct((t, width), FP8), jax.ShapeDtypeStruct((t,), jnp.float32)],
        grid=(grid,), compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=jax.default_backend() != "gpu" if interpret is None else interpret, name=name)(*args)
    return q, scale[:, None]


def quantize_rows(x: jax.Array, norm_weight: jax.Array | None = None, eps: float = 1e-6,
                  scale_ub: jax.Array | None = None, *, interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """x [T, W] -> (e4m3 [T, W], float32 scale [T, 1]); with `norm_weight` [W] the RMS norm of x
    (rounded to x's dtype) is what is quantized. `scale_ub` []: the cap on a row's magnitude."""
    args = (x, *(() if norm_weight is None else (norm_weight,)),
            *(() if scale_ub is None else (scale_ub.astype(jnp.float32).reshape(1),)))
    t, width = x.shape
    block = next_pow2(width)
    kern = functools.partial(_quantize_kernel, width=width, block=block, eps=float(eps), norm=norm_weight is not None,
                             has_ub=scale_ub is not None)
    return _call(kern, "quantize_rows", args, t, width, t, min(16, max(4, block // 1024)), interpret)


def silu_launch(t: int, width: int) -> tuple[int, int, int]:
    """(rows per program, columns per chunk, warps) of `silu_mul_quant`."""
    return 1, min(1024, next_pow2(width)), 16


def silu_mul_quant(sums: jax.Array, row_scale: jax.Array, col_scale: jax.Array, dtype,
                   scale_ub: jax.Array | None = None, *, launch: tuple[int, int, int] | None = None,
                   interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """sums [T, 2, W] (gate, up: an fp8 GEMM's float32 sums), row_scale [T, 1], col_scale [2, W]
    -> the e4m3 values [T, W] and float32 scale [T, 1] of silu(gate) * up (module docstring).
    `launch`: `silu_launch`'s tuple, for tests and sweeps."""
    t, two, width = sums.shape
    assert two == 2 and row_scale.shape == (t, 1) and col_scale.shape == (2, width), (sums.shape, row_scale.shape,
                                                                                       col_scale.shape)
    rows, cols, warps = launch or silu_launch(t, width)
    args = (sums, row_scale.astype(jnp.float32).reshape(t), col_scale.astype(jnp.float32),
            *(() if scale_ub is None else (scale_ub.astype(jnp.float32).reshape(1),)))
    kern = functools.partial(_silu_mul_kernel, t=t, width=width, rows=rows, cols=cols, dtype=jnp.dtype(dtype),
                             has_ub=scale_ub is not None)
    return _call(kern, "silu_mul_quant", args, t, width, pl.cdiv(t, rows), warps, interpret)
