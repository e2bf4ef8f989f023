"""Paged attention over a ragged batch: the pure-jnp reference and the KV write.

Layout of the KV pool, all layers stacked (chosen so one KV head of one page is a
contiguous `[block_size, D]` tile, which is what a GPU kernel streams per program):
    k_pool, v_pool: [L, Hkv, num_blocks, block_size, D]
Functions take the whole pool and a layer index so that no layer is ever sliced out
(a copy of the layer) inside the jitted step. Block 0 is the scratch block that padding
tokens write into.

An fp8 pool (vLLM's `kv_cache_dtype="fp8"`) stores `value / scale`, saturated to the fp8
range, with dequantization scales `k_scale`, `v_scale` [L, Hkv] (float32, per layer and KV
head; a per-tensor scale is broadcast); a reader multiplies by them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30  # finite, so fully masked rows (padding) give no NaN


def quantize_kv(x: jax.Array, scale: jax.Array | None, dtype) -> jax.Array:
    """x [T, Hkv, D] as stored in a pool of `dtype`: for an fp8 pool `x / scale` (scale [Hkv])
    saturated to the format's largest finite value (e4m3 has no infinity: an out-of-range cast
    would be NaN), else a plain cast."""
    if scale is None:
        return x.astype(dtype)
    big = float(jnp.finfo(dtype).max)
    return jnp.clip(x.astype(jnp.float32) / scale[None, :, None], -big, big).astype(dtype)


def dequantize_kv(x: jax.Array, scale: jax.Array | None, head_axis: int) -> jax.Array:
    """Gathered pool values in float32, times their KV head's `scale` [Hkv] (None: 1)."""
    x = x.astype(jnp.float32)
    if scale is None:
        return x
    return x * scale.reshape(scale.shape + (1,) * (x.ndim - head_axis - 1))


def write_kv(
    k_pool: jax.Array, v_pool: jax.Array, layer: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
    k_scale: jax.Array | None = None, v_scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Scatter one layer's new keys/values into their slots, in place when the pool is donated.

    k_pool, v_pool: [L, Hkv, NB, bs, D]; layer: scalar; k, v: [T, Hkv, D];
    slot_mapping: [T] (block * bs + offset); k_scale, v_scale: [L, Hkv] of an fp8 pool.
    """
    nl, hkv, nb, bs, d = k_pool.shape

    def put(pool, new, scale):
        flat = pool.reshape(nl, hkv, nb * bs, d)
        new = quantize_kv(new, None if scale is None else scale[layer], pool.dtype)
        return flat.at[layer, :, slot_mapping].set(new).reshape(pool.shape)

    return put(k_pool, k, k_scale), put(v_pool, v, v_scale)


def token_sequence_ids(query_start: jax.Array, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Sequence index of each token, and whether the token is real (not padding). [T], [T]."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(query_start[1:], t, side="right").astype(jnp.int32)
    valid = t < query_start[-1]
    return jnp.minimum(seq, query_start.shape[0] - 2), valid


def paged_attention_ref(
    q: jax.Array,
    k_pool: jax.Array,
    v_pool: jax.Array,
    layer: jax.Array,
    query_start: jax.Array,
    seq_lens: jax.Array,
    block_tables: jax.Array,
    *,
    scale: float,
    sliding_window: int | jax.Array = 0,
    max_query_len: int | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
) -> jax.Array:
    """Causal attention of ragged new tokens over their sequence's paged context.

    q: [T, Hq, D]; k_pool, v_pool: [L, Hkv, NB, bs, D]; layer: scalar; query_start: [S+1]; seq_lens: [S]
    (context incl. new tokens); block_tables: [S, max_blocks]. Hq is a multiple of Hkv
    (GQA: query head h reads KV head h // (Hq // Hkv)). `sliding_window` > 0 lets a query
    at position p see keys at positions > p - window. `max_query_len` (a static bound on any
    sequence's new tokens) is a launch hint for kernels; the reference needs none. An fp8
    pool's values are multiplied by `k_scale`, `v_scale` [L, Hkv]. Returns [T, Hq, D] in q's
    dtype; padding tokens get arbitrary finite values.
    """
    t, hq, d = q.shape
    _, hkv, _, bs, _ = k_pool.shape
    g = hq // hkv
    seq, valid = token_sequence_ids(query_start, t)
    # Position of each new token in its context: the new tokens are the last ones.
    q_len = query_start[1:] - query_start[:-1]
    q_pos = seq_lens[seq] - q_len[seq] + (jnp.arange(t) - query_start[seq])
    # Gather every sequence's pages into a contiguous context: [Hkv, S, max_blocks * bs, D].
    s, mb = block_tables.shape

    def gather(pool, pool_scale):  # one gather: [S, mb, Hkv, bs, D] -> [Hkv, S, mb * bs, D], float32
        x = pool[layer, :, block_tables].transpose(2, 0, 1, 3, 4).reshape(hkv, s, mb * bs, d)
        return dequantize_kv(x, None if pool_scale is None else pool_scale[layer], 0)

    keys, vals = gather(k_pool, k_scale), gather(v_pool, v_scale)
    qg = q.reshape(t, hkv, g, d).astype(jnp.float32)
    scores = jnp.einsum("thgd,htld->thgl", qg, keys[:, seq]) * scale
    k_pos = jnp.arange(mb * bs)[None, :]
    mask = (k_pos <= q_pos[:, None]) & (k_pos < seq_lens[seq][:, None]) & valid[:, None]
    window = jnp.asarray(sliding_window)
    mask &= (window <= 0) | (k_pos > q_pos[:, None] - window)
    scores = jnp.where(mask[:, None, None, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("thgl,htld->thgd", probs, vals[:, seq])
    return out.reshape(t, hq, d).astype(q.dtype)
