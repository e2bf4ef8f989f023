"""The matmul of each quantized weight kind, `x [T, in] @ w -> [T, *out]` in x's dtype: the seam
where a GPU kernel (Pallas, Triton) replaces a jnp formulation.

- fp8 W8A8: x is quantized to e4m3 per token (or with the static scale) and the dot takes both
  e4m3 operands with a float32 result, which XLA on Hopper lowers to a cuBLASLt fp8 GEMM; the
  token and channel scales multiply the result. On one GPU the per-token quantization is a
  Pallas row kernel (`fp8_row_kernels`), which `layers.rms_norm_for` and `layers.swiglu` also
  fuse with the norm and with silu(gate) * up; x then arrives as an `Fp8Activation`. A
  1-token step on a GPU (batch-1 decode; the engine adds that bucket, `small_step_buckets`)
  sums the same e4m3 products in an XLA multiply-and-reduce fusion over the weight's
  contiguous input rows instead: the fp8 GEMM reads the weight at 2.3 TB/s there, the reduce
  at 2.7 (H200, docs/benchmarks.md). int4 in groups of 128+ gets the 1-token bucket too: the
  kernel's one-token form.
- block fp8 (weight-only in the GEMM): the e4m3 weight times its block scales, in x's dtype,
  feeds a dot with x unquantized (an elementwise operand prologue XLA fuses into the GEMM read;
  docs/decisions.md says why not fp8 x fp8 per K-group).
- int8 W8A16: the int8 weight converted to x's dtype feeds the dot (XLA fuses the convert into
  the GEMM's operand read); the channel scale multiplies the result (group scales: the weight
  is dequantized first).
- int8 W8A8: x is quantized to int8 per token and the dot takes both int8 operands with an
  int32 result; the token and channel scales multiply it.
- int4 W4A16: on the GPU, up to `INT4_KERNEL_MAX_TOKENS` tokens, a Pallas kernel that reads the
  packed weight and dequantizes it in registers (kernels/int4_matmul_gpu.py), per device inside
  shard_map on a tensor-parallel mesh (the weight's `layout`); else (longer, compute-bound
  steps, CPU, a weight without a layout among several devices, where GSPMD would gather it for
  the Pallas call) unpacked and dequantized group by group, then a dot. An act-order weight's
  rows are stored sorted by group: the activations are gathered into that order first.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxpaged.kernels.fp8_quant import MIN_SCALE, quantize_rows_ref, to_fp8
from jaxpaged.models.quantization.weights import (Fp8BlockWeight, Fp8Weight, Int4Weight, Int8W8A8Weight,
                                                  Int8Weight, QuantizedWeight)

FP8_REDUCE_MAX_TOKENS = 1  # fp8 steps of at most this many tokens sum their products in a reduce fusion
INT4_KERNEL_MAX_TOKENS = 256  # beyond, the GEMM is compute-bound: XLA's bf16 GEMM on the dequantized weight


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Activation:
    """A GEMM input already quantized to e4m3 per token (a row kernel made it with the op before
    it): `values` [T, in], float32 `scale` [T, 1]; the GEMM's result is cast to `dtype`."""
    values: jax.Array
    scale: jax.Array
    dtype: jnp.dtype = dataclasses.field(metadata=dict(static=True))


def fp8_row_kernels(w) -> bool:
    """Whether `w`'s inputs are quantized by the row kernels (kernels/fp8_quant_gpu.py): a dynamic
    fp8 weight on a GPU, one device (on a mesh GSPMD would gather a sharded row for the call)."""
    return (isinstance(w, Fp8Weight) and w.input_scale is None and jax.default_backend() == "gpu"
            and jax.device_count() == 1)


def quantize_activations_fp8(x: jax.Array, input_scale: jax.Array | None,
                             input_scale_ub: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x [T, in] -> (e4m3 values, float32 scale [T, 1] or []): per token from each row's largest
    magnitude (at most `input_scale_ub`: larger values saturate), or the static per-tensor
    `input_scale`."""
    if input_scale is None:
        return quantize_rows_ref(x, scale_ub=input_scale_ub)
    scale = input_scale.astype(jnp.float32)
    return to_fp8(x.astype(jnp.float32), scale), scale


def fp8_input(x: jax.Array | Fp8Activation, w: Fp8Weight,
              norm: tuple[jax.Array, float] | None = None) -> Fp8Activation:
    """x as `w`'s GEMM reads it: quantized per token (in one row kernel where `fp8_row_kernels`)
    or with the static scale; an `Fp8Activation` as it is. `norm` (weight, eps), row kernels
    only: the kernel quantizes the RMS norm of x, one launch for both."""
    if isinstance(x, Fp8Activation):
        return x
    if fp8_row_kernels(w):
        from jaxpaged.kernels.fp8_quant_gpu import quantize_rows  # Pallas imported only where it runs

        return Fp8Activation(*quantize_rows(x, *(norm or ()), scale_ub=w.input_scale_ub), x.dtype)
    assert norm is None, "a fused norm needs the row kernels"
    return Fp8Activation(*quantize_activations_fp8(x, w.input_scale, w.input_scale_ub), x.dtype)


def fp8_sums(x: Fp8Activation, w: Fp8Weight, reduce: bool | None = None) -> jax.Array:
    """The unscaled float32 sums [T, *out] of the e4m3 products. `reduce` (None: on a GPU, up to
    `FP8_REDUCE_MAX_TOKENS` tokens): summed by an XLA multiply-and-reduce fusion over the weight's
    contiguous input rows instead of the fp8 GEMM, which at a few tokens reads the weight well
    below the memory's bandwidth."""
    t = x.values.shape[0]
    if reduce is None:
        reduce = jax.default_backend() == "gpu" and t <= FP8_REDUCE_MAX_TOKENS
    if reduce:  # [T, *1, in] * [*out, in], summed over in
        xb = x.values.astype(jnp.float32).reshape(t, *(1,) * (w.qweight.ndim - 1), x.values.shape[1])
        return jnp.sum(xb * w.qweight.astype(jnp.float32), axis=-1)
    return jax.lax.dot_general(x.values, w.qweight, (((1,), (w.qweight.ndim - 1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def fp8_matmul(x: jax.Array | Fp8Activation, w: Fp8Weight, reduce: bool | None = None) -> jax.Array:
    """x (or its `Fp8Activation`) @ w: the e4m3 sums (`fp8_sums`) times the token and channel scales."""
    x = fp8_input(x, w)
    y = fp8_sums(x, w, reduce)
    out_axes = (1,) * w.scale.ndim
    return (y * jnp.reshape(x.scale, (-1, *out_axes)) * w.scale).astype(x.dtype)


def fp8_block_matmul(x: jax.Array, w: Fp8BlockWeight) -> jax.Array:
    wq = w.dequantize_out_in(x.dtype)  # [*out, in]
    y = jax.lax.dot_general(x, wq, (((1,), (wq.ndim - 1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def int8_matmul(x: jax.Array, w: Int8Weight) -> jax.Array:
    x = w.stored_order(x)  # act-order: the activations in the weight's stored row order
    if w.grouped:
        return jnp.tensordot(x, w.dequantize_stored().astype(x.dtype), axes=1)
    y = jnp.tensordot(x, w.qweight.astype(x.dtype), axes=1, preferred_element_type=jnp.float32)
    return (y * w.scale).astype(x.dtype)


def int8_w8a8_matmul(x: jax.Array, w: Int8W8A8Weight) -> jax.Array:
    """x rounded to int8 per token (scale: the row's largest magnitude / 127), an int8 x int8 dot
    into int32, times the token and channel scales."""
    x32 = x.astype(jnp.float32)
    x_scale = jnp.maximum(jnp.max(jnp.abs(x32), axis=-1, keepdims=True), MIN_SCALE) / 127.0
    xq = jnp.clip(jnp.round(x32 / x_scale), -127, 127).astype(jnp.int8)
    y = jnp.tensordot(xq, w.qweight, axes=1, preferred_element_type=jnp.int32).astype(jnp.float32)
    return (y * jnp.reshape(x_scale, (-1, *(1,) * w.scale.ndim)) * w.scale).astype(x.dtype)


def _local_shape(w: Int4Weight) -> tuple[int, int]:
    """(in, prod(out)) of one device's part of `w`."""
    shape = w.shape if w.layout is None else w.layout.shard_shape(w.shape)
    return shape[0], math.prod(shape[1:])


def int4_kernel_applies(tokens: int, w: Int4Weight) -> bool:
    if jax.default_backend() != "gpu" or tokens > INT4_KERNEL_MAX_TOKENS:
        return False
    if w.layout is None and jax.device_count() != 1:  # GSPMD would gather the weight for the Pallas call
        return False
    from jaxpaged.kernels.int4_matmul_gpu import supported  # Pallas imported only where it runs

    return supported(*_local_shape(w), w.group_size)


def _int4_kernel(x: jax.Array, qweight: jax.Array, scales: jax.Array, zeros: jax.Array) -> jax.Array:
    from jaxpaged.kernels.int4_matmul_gpu import int4_matmul_gpu

    flat = lambda a: a.reshape(a.shape[0], -1)  # noqa: E731
    return int4_matmul_gpu(x, flat(qweight), flat(scales), flat(zeros)).reshape(x.shape[0], *qweight.shape[1:])


def _int4_kernel_per_device(x: jax.Array, w: Int4Weight) -> jax.Array:
    """The kernel on each device's part of `w` (its `layout`), inside shard_map: a
    column-parallel part gives its output columns, a row-parallel part partial sums that add
    across the mesh axis."""
    spec = (*w.layout.spec, *(None,) * (len(w.shape) - len(w.layout.spec)))
    rows = spec[0]  # the axis splitting the input rows (row-parallel), or None

    def local(x, qweight, scales, zeros):
        y = _int4_kernel(x, qweight, scales, zeros)
        return y if rows is None else jax.lax.psum(y, rows)

    field = P(*spec)
    return jax.shard_map(local, mesh=w.layout.mesh, in_specs=(P(None, rows), field, field, field),
                         out_specs=P(None, *spec[1:]), check_vma=False)(x, w.qweight, w.scales, w.zeros)


def int4_matmul(x: jax.Array, w: Int4Weight, kernel: bool | None = None) -> jax.Array:
    """`kernel`: the Pallas kernel (None: where `int4_kernel_applies`; True off-GPU: interpret
    mode), per device where the weight has a tensor-parallel `layout`. An act-order weight
    (`perm`) takes the activations in its stored row order."""
    x = w.stored_order(x)
    if not (int4_kernel_applies(x.shape[0], w) if kernel is None else kernel):
        return jnp.tensordot(x, w.dequantize_stored().astype(x.dtype), axes=1)
    if w.layout is not None:
        return _int4_kernel_per_device(x, w)
    return _int4_kernel(x, w.qweight, w.scales, w.zeros)


_MATMULS = {Fp8Weight: fp8_matmul, Fp8BlockWeight: fp8_block_matmul, Int8Weight: int8_matmul,
            Int8W8A8Weight: int8_w8a8_matmul, Int4Weight: int4_matmul}


def small_step_buckets(params) -> tuple[int, ...]:
    """Padded step sizes the quantized matmuls want beside the engine's bucket rule (whose
    smallest is 16 tokens): on a GPU, fp8 weights sum 1-token steps in a reduce fusion and int4
    weights in groups of 128+ take the kernel's one-token FMA form, so batch-1 decode gets a
    1-token bucket."""
    if jax.default_backend() != "gpu":
        return ()
    from jaxpaged.kernels.int4_matmul_gpu import takes_matvec  # Pallas imported only where it runs

    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    fp8 = {FP8_REDUCE_MAX_TOKENS for leaf in leaves if isinstance(leaf, Fp8Weight)}
    int4 = {1 for leaf in leaves
            if isinstance(leaf, Int4Weight) and takes_matvec(1, leaf.group_size) and int4_kernel_applies(1, leaf)}
    return tuple(sorted(fp8 | int4))


def quantized_matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x [T, in] @ the quantized weight -> [T, *out] in x's dtype, by the weight's kind."""
    return _MATMULS[type(w)](x, w)
