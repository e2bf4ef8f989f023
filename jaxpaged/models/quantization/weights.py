"""Quantized weight leaves of the params tree, what `layers.linear` dispatches on.

A dense weight is an array `[in, *out]`; a quantized one is one of these registered dataclasses,
whose fields are arrays (pytree children), so the params tree, its jit and its sharding treat it
like any other subtree. Every output-channel axis is last in every field except the fp8 weight's,
so fusing q/k/v or gate/up (`fuse_out`) and tensor-parallel specs (`partition_specs`) follow
the dense weight's.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxpaged.models.config import ConfigError

FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
INT4_PER_WORD = 8  # int4 values packed into one int32 word along the input axis


class QuantizedWeight:
    """A weight `[in, *out]` stored quantized; `shape` is the dense one."""

    shape: tuple[int, ...]

    def dequantize(self) -> jax.Array:
        """The float32 weight `[in, *out]` the quantized values and scales stand for."""
        raise NotImplementedError

    def partition_specs(self, spec: P) -> QuantizedWeight:
        """The specs of this leaf's fields, from the dense weight's `spec` (same class, P fields)."""
        raise NotImplementedError

    @classmethod
    def fuse(cls, parts: list, combine: Callable[[list[jax.Array]], jax.Array]) -> QuantizedWeight:
        """`combine` (an op on the trailing output axes) applied field by field."""
        return cls(*(combine([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)))


def _padded(spec: P, ndim: int) -> tuple:
    return (*spec, *(None,) * (ndim - len(spec)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Weight(QuantizedWeight):
    """fp8 W8A8: e4m3 weights with one scale per output channel; activations quantized to e4m3
    per token on the fly (`input_scale` None) or with the checkpoint's static per-tensor scale."""
    qweight: jax.Array  # float8_e4m3fn [*out, in]: the contracted axis minor, as cuBLASLt's fp8 GEMM reads it
    scale: jax.Array  # float32 [*out]
    input_scale: jax.Array | None = None  # float32 []

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.qweight.shape[-1], *self.qweight.shape[:-1])

    def dequantize(self) -> jax.Array:
        return jnp.moveaxis(self.qweight.astype(jnp.float32) * self.scale[..., None], -1, 0)

    def partition_specs(self, spec: P) -> Fp8Weight:
        s = _padded(spec, len(self.shape))
        return Fp8Weight(P(*s[1:], s[0]), P(*s[1:]), None if self.input_scale is None else P())

    @classmethod
    def fuse(cls, parts: list[Fp8Weight], combine) -> Fp8Weight:
        """The fused activation scale is the largest (the one input then fits all the parts)."""
        q = combine([jnp.moveaxis(p.qweight, -1, 0) for p in parts])
        scales = [p.input_scale for p in parts]
        input_scale = None if scales[0] is None else jnp.max(jnp.stack(scales))
        return cls(jnp.moveaxis(q, 0, -1), combine([p.scale for p in parts]), input_scale)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight(QuantizedWeight):
    """W8A16: symmetric int8 weights with one scale per output channel."""
    qweight: jax.Array  # int8 [in, *out]
    scale: jax.Array  # float32 [*out]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.qweight.shape

    def dequantize(self) -> jax.Array:
        return self.qweight.astype(jnp.float32) * self.scale

    def partition_specs(self, spec: P) -> Int8Weight:
        return Int8Weight(spec, P(*_padded(spec, len(self.shape))[1:]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int4Weight(QuantizedWeight):
    """W4A16 (AWQ, GPTQ): 4-bit weights packed 8 to an int32 along the input axis (row 8i + j in
    bits 4j..4j+3 of word i, GPTQ's order); each group of `in / scales.shape[0]` input rows has a
    scale and a zero point per output channel: w = (q - zero) * scale."""
    qweight: jax.Array  # int32 [in / 8, *out]
    scales: jax.Array  # float16 / bfloat16 / float32 [in / group, *out]
    zeros: jax.Array  # uint8 [in / group, *out]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.qweight.shape[0] * INT4_PER_WORD, *self.qweight.shape[1:])

    @property
    def group_size(self) -> int:
        return self.shape[0] // self.scales.shape[0]

    def dequantize(self) -> jax.Array:
        q = unpack_int4(self.qweight)
        grouped = q.reshape(self.scales.shape[0], self.group_size, *q.shape[1:])
        w = (grouped - self.zeros[:, None].astype(jnp.int32)).astype(jnp.float32) * self.scales[:, None].astype(jnp.float32)
        return w.reshape(q.shape)

    def partition_specs(self, spec: P) -> Int4Weight:
        return Int4Weight(spec, spec, spec)  # the packed and grouped input rows split as the dense ones


def unpack_int4(packed: jax.Array) -> jax.Array:
    """int32 `[n / 8, *out]` -> int32 values 0..15 `[n, *out]` (`Int4Weight`'s packing)."""
    shifts = (4 * jnp.arange(INT4_PER_WORD, dtype=jnp.int32)).reshape(1, INT4_PER_WORD, *(1,) * (packed.ndim - 1))
    values = (packed[:, None] >> shifts) & 0xF
    return values.reshape(packed.shape[0] * INT4_PER_WORD, *packed.shape[1:])


def pack_int4(values: jax.Array) -> jax.Array:
    """Values 0..15 `[n, *out]` (n a multiple of 8) -> int32 `[n / 8, *out]`, the inverse of `unpack_int4`."""
    v = jnp.asarray(values).astype(jnp.uint32).reshape(-1, INT4_PER_WORD, *values.shape[1:])
    shifts = (4 * jnp.arange(INT4_PER_WORD, dtype=jnp.uint32)).reshape(1, INT4_PER_WORD, *(1,) * (values.ndim - 1))
    return jax.lax.bitcast_convert_type(jnp.sum(v << shifts, axis=1, dtype=jnp.uint32), jnp.int32)


def leaf_specs(value, spec: P):
    """A param's spec: `spec` for a dense array, one per field (from `spec`) for a quantized leaf."""
    return value.partition_specs(spec) if isinstance(value, QuantizedWeight) else spec


def fuse_out(parts: list, combine: Callable[[list[jax.Array]], jax.Array]):
    """`combine` (concatenate, stack, reshape: an op on the trailing output axes) of several HF
    tensors into one param: dense arrays directly, quantized leaves field by field."""
    kinds = {type(p) for p in parts}
    if len(kinds) > 1:
        raise ConfigError(f"cannot fuse weights stored differently: {', '.join(sorted(k.__name__ for k in kinds))}")
    if isinstance(parts[0], QuantizedWeight):
        return type(parts[0]).fuse(parts, combine)
    return combine(parts)
