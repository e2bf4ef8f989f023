"""Building blocks shared by the model families: the weight ops (`embed`, `linear`, `lm_head`),
norms, RoPE and the paged-attention step."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpaged.kernels.paged_attention import write_kv
from jaxpaged.models.kv_cache import KVCache
from jaxpaged.models.quantization import QuantizedWeight, quantized_matmul
from jaxpaged.models.quantization import kernels as qk
from jaxpaged.models.step_input import StepInput


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rms_norm_for(x: jax.Array, w: jax.Array, eps: float,
                 weight: jax.Array | QuantizedWeight) -> jax.Array | qk.Fp8Activation:
    """`rms_norm(x, w, eps)` as `linear(_, weight)` reads it: for a weight whose inputs the fp8
    row kernels quantize, the norm and its per-token e4m3 values in one launch."""
    if not qk.fp8_row_kernels(weight):
        return rms_norm(x, w, eps)
    return qk.fp8_input(x, weight, norm=(w, eps))


def swiglu(h: jax.Array | qk.Fp8Activation, w_gate_up: jax.Array | QuantizedWeight,
           w_down: jax.Array | QuantizedWeight, b_gate_up: jax.Array | None = None,
           b_down: jax.Array | None = None) -> jax.Array:
    """down(silu(gate) * up): h [T, H], w_gate_up [H, 2, I], w_down [I, H] -> [T, H]. With fp8
    weights quantized by the row kernels, the gate/up GEMM's float32 sums go to one kernel that
    scales them, takes silu(gate) * up and quantizes it for the down GEMM."""
    if qk.fp8_row_kernels(w_gate_up) and qk.fp8_row_kernels(w_down) and b_gate_up is None:
        from jaxpaged.kernels.fp8_quant_gpu import silu_mul_quant

        x = qk.fp8_input(h, w_gate_up)
        sums = qk.fp8_sums(x, w_gate_up)
        act = qk.Fp8Activation(*silu_mul_quant(sums, x.scale, w_gate_up.scale, x.dtype, w_down.input_scale_ub), x.dtype)
        return linear(act, w_down, b_down)
    gate_up = linear(h, w_gate_up, b_gate_up)  # [T, 2, I]
    return linear(jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1], w_down, b_down)


def layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * w.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE as in HF Llama. x: [T, H, D]; positions: [T]; inv_freq: [D/2]."""
    ang = positions[:, None].astype(jnp.float32) * inv_freq[None, :]  # [T, D/2]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[:, None, :]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[:, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def linear(x: jax.Array | qk.Fp8Activation, w: jax.Array | QuantizedWeight, b: jax.Array | None = None) -> jax.Array:
    """x: [T, in], w: [in, *out] (b: [*out]) -> [T, *out]: x's last axis contracted with w's
    first, so a fused weight (`wqkv` [H, Hkv, G + 2, D], `w_gate_up` [H, 2, I]) is one GEMM.

    Every matmul of a model with a weight goes through here: a quantized weight leaf (fp8,
    int8, int4; models/quantization) runs its own kernel; an fp8 one also takes its input
    already quantized (`Fp8Activation`, from `rms_norm_for` or `swiglu`)."""
    y = quantized_matmul(x, w) if isinstance(w, QuantizedWeight) else jnp.tensordot(x, w, axes=1)
    return y if b is None else y + b


def embed(table: jax.Array, ids: jax.Array, multiplier: float = 1.0) -> jax.Array:
    """Rows `ids` [T] of `table` [V, H] -> [T, H], times `multiplier` (Granite scales them)."""
    x = table[ids]
    return x if multiplier == 1.0 else x * jnp.asarray(multiplier, x.dtype)


def lm_head(h: jax.Array, params: dict, scaling: float = 1.0) -> jax.Array:
    """h: [N, H] -> float32 logits [N, V] through `params["lm_head"]` [H, V], or without one
    (tied embeddings) the embedding table [V, H] transposed; divided by `scaling` (Granite)."""
    w = params["lm_head"] if "lm_head" in params else params["embed"].T
    logits = linear(h, w).astype(jnp.float32)
    return logits if scaling == 1.0 else logits / scaling


def paged_attend(q, k, v, kv: KVCache, layer, inp: StepInput, attention, scale: float,
                 window=0) -> tuple[jax.Array, KVCache]:
    """Write this layer's new K/V into the pool (an fp8 pool: quantized with its scales), then
    attend over the paged context.

    q: [T, Hq, D]; k, v: [T, Hkv, D]. Returns (out [T, Hq * D], kv).
    """
    k_all, v_all = write_kv(kv.k, kv.v, layer, k, v, inp.slot_mapping, kv.k_scale, kv.v_scale)
    scales = {} if kv.k_scale is None else {"k_scale": kv.k_scale, "v_scale": kv.v_scale}
    out = attention(
        q, k_all, v_all, layer, inp.query_start, inp.seq_lens, inp.block_tables,
        scale=scale, sliding_window=window, **scales,
    )
    return out.reshape(q.shape[0], -1), kv.replace(k=k_all, v=v_all)
