"""Building blocks shared by the model families: the weight ops (`embed`, `linear`, `lm_head`),
norms, RoPE and the paged-attention step."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpaged.kernels.paged_attention import write_kv
from jaxpaged.models.kv_cache import KVCache
from jaxpaged.models.quantization import QuantizedWeight, quantized_matmul
from jaxpaged.models.step_input import StepInput


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


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


def linear(x: jax.Array, w: jax.Array | QuantizedWeight, b: jax.Array | None = None) -> jax.Array:
    """x: [T, in], w: [in, *out] (b: [*out]) -> [T, *out]: x's last axis contracted with w's
    first, so a fused weight (`wqkv` [H, Hkv, G + 2, D], `w_gate_up` [H, 2, I]) is one GEMM.

    Every matmul of a model with a weight goes through here: a quantized weight leaf (fp8,
    int8, int4; models/quantization) runs its own kernel."""
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
