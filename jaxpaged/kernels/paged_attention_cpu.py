"""Paged attention for the CPU: `paged_attention_ref`'s result, at a cost that follows the
step's real context lengths instead of `max_model_len`.

The reference gathers every token's whole block table ([T, max_model_len] keys per layer): on
a CPU a padded 256-token step then takes seconds whatever its context. Here a loop walks the
context `CHUNK_TOKENS` positions at a time, as far as the step's longest sequence reaches (no
iteration for an all-padding step), and merges the chunks with an online softmax (as flash
attention does). One loop, no separate path for the step's own tokens: each forward compiles
about as fast as with the reference (start-up time).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpaged.kernels.paged_attention import MASK_VALUE, dequantize_kv, token_sequence_ids

CHUNK_TOKENS = 128  # context positions per loop iteration


def paged_attention_cpu(
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
    """`paged_attention_ref`'s signature and result (the new tokens' K/V already written);
    `max_query_len` is a kernel launch hint, not needed here."""
    t, hq, d = q.shape
    _, hkv, _, bs, _ = k_pool.shape
    g = hq // hkv
    seq, valid = token_sequence_ids(query_start, t)
    q_len = query_start[1:] - query_start[:-1]
    q_pos = seq_lens[seq] - q_len[seq] + (jnp.arange(t) - query_start[seq])  # the new tokens are the last ones
    window = jnp.asarray(sliding_window)
    qg = q.reshape(t, hkv, g, d).astype(jnp.float32) * scale
    c = max(1, CHUNK_TOKENS // bs)  # blocks per iteration
    tables = jnp.pad(block_tables, ((0, 0), (0, -block_tables.shape[1] % c)))[seq]  # [T, blocks]; 0: scratch
    chunk = c * bs

    def body(i, carry):
        m, l, acc = carry  # running max, sum of weights, weighted values: [T, Hkv, G(, D)]
        blocks = jax.lax.dynamic_slice_in_dim(tables, i * c, c, axis=1)  # [T, c]

        def gather(pool, pool_scale):  # [T, c, Hkv, bs, D] -> [T, Hkv, c * bs, D], float32
            x = pool[layer, :, blocks].transpose(0, 2, 1, 3, 4).reshape(t, hkv, chunk, d)
            return dequantize_kv(x, None if pool_scale is None else pool_scale[layer], 1)

        k_pos = i * chunk + jnp.arange(chunk)[None, :]
        mask = (k_pos <= q_pos[:, None]) & valid[:, None]  # causal (so within the context)
        mask = (mask & ((window <= 0) | (k_pos > q_pos[:, None] - window)))[:, None, None, :]
        scores = jnp.where(mask, jnp.einsum("thgd,thkd->thgk", qg, gather(k_pool, k_scale)), MASK_VALUE)
        m_new = jnp.maximum(m, scores.max(-1))
        p = jnp.where(mask, jnp.exp(scores - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("thgk,thkd->thgd", p, gather(v_pool, v_scale))
        return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv

    init = (jnp.full((t, hkv, g), MASK_VALUE, jnp.float32), jnp.zeros((t, hkv, g), jnp.float32),
            jnp.zeros((t, hkv, g, d), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, (jnp.max(seq_lens) + chunk - 1) // chunk, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # padding tokens: 0
    return out.reshape(t, hq, d).astype(q.dtype)
