"""vLLM's top-k then top-p filter as one threshold per row, without sorting the vocabulary:
two bisections over order-preserving int32 keys of the logits (`top_k_top_p_threshold`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

BISECT_STEPS = 32  # int32 keys: 32 halvings narrow any key interval to one key
_NEG_INF_KEY = -0x7F800001  # _f32_key(-inf), below every other non-NaN key


def _f32_key(x: jax.Array) -> jax.Array:
    """Order-preserving int32 key of f32 x (its own inverse on the bits); -0.0 maps as +0.0."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _key_f32(key: jax.Array) -> jax.Array:
    """Inverse of `_f32_key`."""
    return jax.lax.bitcast_convert_type(key ^ ((key >> 31) & 0x7FFFFFFF), jnp.float32)


def _midpoint(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """floor((lo + hi) / 2) of int32s without overflow."""
    return (lo & hi) + ((lo ^ hi) >> 1)


def top_k_top_p_threshold(x: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Smallest logit kept by top_k then top_p (vLLM). x: [S, V] f32, top_k: [S] in [1, V]
    (V = off), top_p: [S] (>= 1 = off) -> [S, 1], so that `x >= thr` is the kept set.

    No sort of the vocab (slow on GPU for large V): two per-row bisections over the
    order-preserving int32 keys of x, each a static unrolled chain of 32 fused [S, V]
    reductions. top_k: the k-th largest key, the largest t with count(key >= t) >= k (ties at
    the cut are kept). top_p, on the distribution renormalised over exactly k tokens (as the
    sort-based version does): the smallest key t >= that with mass(key > t) < p * mass(top k),
    i.e. a token is kept iff the mass of strictly better tokens is < p; the top token always
    is. Masses are summed in a different order than a sorted cumsum, so a cut may differ only
    where a cumulative sum is within float rounding of p.
    """
    key = _f32_key(x)
    k = top_k[:, None]
    top = key.max(-1, keepdims=True)
    lo, hi = jnp.full_like(k, _NEG_INF_KEY), top + 1  # count(key >= lo) = V >= k > 0 = count(key >= hi)
    for _ in range(BISECT_STEPS):
        mid = _midpoint(lo, hi)
        ok = jnp.sum(key >= mid, axis=-1, keepdims=True, dtype=jnp.int32) >= k
        lo, hi = jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)
    kth = lo

    m = _key_f32(top)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(x - m)
    above = key > kth  # mass of the top k: those above the cut, then copies of the k-th value
    n_above = jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
    mass_k = jnp.sum(jnp.where(above, e, 0.0), axis=-1, keepdims=True) + (k - n_above) * jnp.exp(_key_f32(kth) - m)
    bound = top_p[:, None] * mass_k
    lo, hi = kth - 1, top  # search (lo, hi]: hi, the top token, is always kept
    for _ in range(BISECT_STEPS):
        mid = _midpoint(lo, hi)
        ok = jnp.sum(jnp.where(key > mid, e, 0.0), axis=-1, keepdims=True) < bound
        lo, hi = jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)
    return _key_f32(jnp.where(top_p[:, None] >= 1.0, kth, jnp.maximum(hi, kth)))
