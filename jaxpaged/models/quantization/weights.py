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
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpaged.models.config import ConfigError
from jaxpaged.models.quantization.packing import INT4_PER_WORD, group_order, pack_int4, unpack_int4



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
        """`combine` (an op on the trailing output axes) applied to each array field (static
        fields keep their defaults)."""
        return cls(**{f.name: combine([getattr(p, f.name) for p in parts])
                      for f in dataclasses.fields(cls) if not f.metadata.get("static")})


def _padded(spec: P, ndim: int) -> tuple:
    return (*spec, *(None,) * (ndim - len(spec)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Weight(QuantizedWeight):
    """fp8 W8A8: e4m3 weights with one scale per output channel; activations quantized to e4m3
    per token on the fly (`input_scale` None; each token's largest magnitude capped at
    `input_scale_ub` where the checkpoint sets one, FBGEMM's) or with the checkpoint's static
    per-tensor scale."""
    qweight: jax.Array  # float8_e4m3fn [*out, in]: the contracted axis minor, as cuBLASLt's fp8 GEMM reads it
    scale: jax.Array  # float32 [*out]
    input_scale: jax.Array | None = None  # float32 []
    input_scale_ub: jax.Array | None = None  # float32 []: fbgemm_fp8's activation_scale_ub

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.qweight.shape[-1], *self.qweight.shape[:-1])

    def dequantize(self) -> jax.Array:
        return jnp.moveaxis(self.qweight.astype(jnp.float32) * self.scale[..., None], -1, 0)

    def partition_specs(self, spec: P) -> Fp8Weight:
        s = _padded(spec, len(self.shape))
        return Fp8Weight(P(*s[1:], s[0]), P(*s[1:]), None if self.input_scale is None else P(),
                         None if self.input_scale_ub is None else P())

    @classmethod
    def fuse(cls, parts: list[Fp8Weight], combine) -> Fp8Weight:
        """The fused activation scale is the largest (the one input then fits all the parts)."""
        scales = [p.input_scale for p in parts]
        input_scale = None if scales[0] is None else jnp.max(jnp.stack(scales))
        return cls(_fuse_in_minor(parts, "qweight", combine), combine([p.scale for p in parts]), input_scale,
                   parts[0].input_scale_ub)  # one per checkpoint


def _fuse_in_minor(parts: list, name: str, combine) -> jax.Array:
    """`combine` of field `name` `[*out, x]` of each part along the output axes."""
    return jnp.moveaxis(combine([jnp.moveaxis(getattr(p, name), -1, 0) for p in parts]), 0, -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8BlockWeight(QuantizedWeight):
    """Block-scaled fp8 (DeepSeek-V3, Qwen3-FP8: `weight_block_size`): e4m3 weights with one
    scale per block of `block_k` input rows and block_n output channels, the block scale stored
    for each output channel (block_n rows repeat it, 4 / block_k bytes per weight) so that
    fusing and sharding follow the output axes as `Fp8Weight`'s do."""
    qweight: jax.Array  # float8_e4m3fn [*out, in]
    scale: jax.Array  # float32 [*out, ceil(in / block_k)]
    block_k: int = dataclasses.field(default=128, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.qweight.shape[-1], *self.qweight.shape[:-1])

    def dequantize(self) -> jax.Array:
        return jnp.moveaxis(self.dequantize_out_in(jnp.float32), -1, 0)

    def dequantize_out_in(self, dtype) -> jax.Array:
        """The weight `[*out, in]` in `dtype` (each input row times its block's scale)."""
        scale = jnp.repeat(self.scale, self.block_k, axis=-1)[..., :self.qweight.shape[-1]]
        return (self.qweight.astype(jnp.float32) * scale).astype(dtype)

    def partition_specs(self, spec: P) -> Fp8BlockWeight:
        s = _padded(spec, len(self.shape))
        return Fp8BlockWeight(P(*s[1:], s[0]), P(*s[1:], s[0]), self.block_k)

    @classmethod
    def fuse(cls, parts: list[Fp8BlockWeight], combine) -> Fp8BlockWeight:
        return cls(_fuse_in_minor(parts, "qweight", combine), _fuse_in_minor(parts, "scale", combine), parts[0].block_k)


class RowOrderedWeight(QuantizedWeight):
    """A weight whose input rows may be stored in another order than the checkpoint's (act-order,
    `perm`: stored row j is the checkpoint's input row `perm[j]`); the matmul then takes the
    activations in the stored order (`stored_order`)."""

    perm: jax.Array | None

    def dequantize_stored(self) -> jax.Array:
        """The float weight in its stored row order."""
        raise NotImplementedError

    def dequantize(self) -> jax.Array:
        w = self.dequantize_stored()
        return w if self.perm is None else w[jnp.argsort(self.perm)]  # the checkpoint's row order

    def stored_order(self, x: jax.Array) -> jax.Array:
        """The activations `[T, in]` with their input axis in the weight's stored row order."""
        return x if self.perm is None else jnp.take(x, self.perm, axis=-1)

    def perm_spec(self) -> P | None:
        """`perm`'s spec: replicated, as it indexes the whole activation row."""
        return None if self.perm is None else P(None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight(RowOrderedWeight):
    """W8A16: symmetric int8 weights with one scale per output channel, or per group of input
    rows and output channel (compressed-tensors' W8A16 groups, GPTQ 8-bit). An act-order GPTQ
    weight's rows are stored sorted by group, as `Int4Weight`'s (`perm`)."""
    qweight: jax.Array  # int8 [in, *out]
    scale: jax.Array  # float32 [*out] (per channel) or [in / group, *out]
    perm: jax.Array | None = None  # int32 [in]: act-order, the checkpoint's input row of each stored row

    @classmethod
    def act_order(cls, qweight, scale, g_idx) -> Int8Weight:
        """The weight of an act-order checkpoint (host arrays, `g_idx` as `Int4Weight.act_order`'s)."""
        perm = group_order(g_idx, scale.shape[0])
        return cls(np.asarray(qweight)[perm], scale, perm)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.qweight.shape

    @property
    def grouped(self) -> bool:
        return self.scale.ndim == self.qweight.ndim

    def dequantize_stored(self) -> jax.Array:
        """The float weight in its stored row order (`perm`'s, for act-order)."""
        q = self.qweight.astype(jnp.float32)
        if not self.grouped:
            return q * self.scale
        return (q.reshape(self.scale.shape[0], -1, *q.shape[1:]) * self.scale[:, None]).reshape(q.shape)

    def partition_specs(self, spec: P) -> Int8Weight:
        return type(self)(spec, spec if self.grouped else P(*_padded(spec, len(self.shape))[1:]), self.perm_spec())

    @classmethod
    def fuse(cls, parts: list[Int8Weight], combine) -> Int8Weight:
        return cls(combine([p.qweight for p in parts]), combine([p.scale for p in parts]), _shared_perm(parts))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8W8A8Weight(Int8Weight):
    """W8A8 int8 (compressed-tensors `int-quantized`): `Int8Weight` per output channel, the
    activations quantized to int8 per token at run time and multiplied in int32.

    `activations` is static pytree data: jax's tree structures of dataclasses compare field
    names, not types, so without it a jit cache could take this weight for an `Int8Weight` of
    the same shapes and run the W8A16 program."""
    activations: str = dataclasses.field(default="int8", metadata={"static": True})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int4Weight(RowOrderedWeight):
    """W4A16 (AWQ, GPTQ, compressed-tensors): 4-bit weights packed 8 to an int32 along the input
    axis (row 8i + j in bits 4j..4j+3 of word i, GPTQ's order); each group of `in /
    scales.shape[0]` consecutive input rows has a scale and a zero point per output channel:
    w = (q - zero) * scale. An act-order checkpoint's rows are stored sorted by group
    (`act_order`): stored row j is the checkpoint's input row `perm[j]`, and the matmul takes
    the activations as `x[:, perm]` (vLLM's shuffle of act-order weights), so every int4 weight
    has consecutive groups, as the GPU kernel reads them."""
    qweight: jax.Array  # int32 [in / 8, *out]
    scales: jax.Array  # float16 / bfloat16 / float32 [in / group, *out]
    zeros: jax.Array  # uint8 [in / group, *out]
    perm: jax.Array | None = None  # int32 [in]: act-order, the checkpoint's input row of each stored row
    # On a tensor-parallel mesh, the dense weight's layout there (`models/sharding.with_kernel_layouts`),
    # every field split alike: the GPU kernel then runs per device inside shard_map.
    layout: NamedSharding | None = dataclasses.field(default=None, metadata={"static": True})

    @classmethod
    def act_order(cls, qweight, scales, zeros, g_idx) -> Int4Weight:
        """The weight of an act-order checkpoint (host arrays; `g_idx` [in]: input row i is in
        group g_idx[i]) with its rows sorted by group, each group `group_size` rows as GPTQ makes them."""
        perm = group_order(g_idx, scales.shape[0])
        return cls(np.asarray(pack_int4(np.asarray(unpack_int4(jnp.asarray(qweight)))[perm])), scales, zeros, perm)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.qweight.shape[0] * INT4_PER_WORD, *self.qweight.shape[1:])

    @property
    def group_size(self) -> int:
        return self.shape[0] // self.scales.shape[0]

    def dequantize_stored(self) -> jax.Array:
        """The float weight in its stored row order (`perm`'s, for act-order)."""
        q = unpack_int4(self.qweight)
        grouped = q.reshape(self.scales.shape[0], self.group_size, *q.shape[1:])
        w = (grouped - self.zeros[:, None].astype(jnp.int32)).astype(jnp.float32) * self.scales[:, None].astype(jnp.float32)
        return w.reshape(q.shape)

    def partition_specs(self, spec: P) -> Int4Weight:
        return Int4Weight(spec, spec, spec, self.perm_spec(), self.layout)  # the packed and grouped input rows split as the dense ones

    @classmethod
    def fuse(cls, parts: list[Int4Weight], combine) -> Int4Weight:
        return cls(*(combine([getattr(p, n) for p in parts]) for n in ("qweight", "scales", "zeros")),
                   _shared_perm(parts))


def _shared_perm(parts: list) -> jax.Array | None:
    """Fused modules share their input, so act-order gives them one row order (as vLLM assumes)."""
    perm = parts[0].perm
    if any((p.perm is None) != (perm is None) or (perm is not None and not jnp.array_equal(p.perm, perm))
           for p in parts):
        raise ConfigError("cannot fuse act-order weights whose g_idx differ (modules sharing an input)")
    return perm


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
