"""Paged attention for the CPU: `paged_attention_ref`'s result, at a cost that follows the
step's real context lengths instead of `max_model_len`.

The reference gathers every token's whole block table ([T, max_model_len] keys per layer): on
a CPU a padded 256-token step then takes seconds whatever its context. Here a loop walks the
context `CHUNK_TOKENS` positions at a time, as far as the step's longest sequence reaches (no
iteration for an all-padding step), and merges the chunks with an online softmax (as flash
attention does). The new tokens go in query blocks of up to `block_q` tokens of one sequence
(as the GPU kernel's per-q-block programs): each block gathers its sequence's keys once, so a
long prompt's chunk is not copied once per token (a 1k-token prefill step moved ~100 MB per
chunk per layer that way). Decode-shaped steps (fewer than two tokens per sequence slot) keep
one token per block. One loop, no separate path for the step's own tokens: each forward
compiles about as fast as with the reference (start-up time).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpaged.kernels.paged_attention import MASK_VALUE, dequantize_kv, token_sequence_ids

CHUNK_TOKENS = 128  # context positions per loop iteration
MAX_BLOCK_Q = 64  # new tokens per query block, at most


def query_block_size(num_tokens: int, num_seqs: int) -> int:
    """Tokens per query block for a step's static shape: the largest power of two at most the
    tokens per sequence slot (capped), so the padded blocks add at most `num_seqs * block_q`."""
    per_seq = max(1, num_tokens // max(1, num_seqs))
    return min(MAX_BLOCK_Q, 1 << (per_seq.bit_length() - 1))


def query_blocks(query_start: jax.Array, num_tokens: int, block_q: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each query block's sequence, first token and token count ([NQB] each, NQB =
    cdiv(T, block_q) + S; blocks past the last hold 0 tokens): sequence s's new tokens split
    into cdiv(q_len, block_q) blocks, in order."""
    s = query_start.shape[0] - 1
    q_len = query_start[1:] - query_start[:-1]
    nb = (q_len + block_q - 1) // block_q
    cum = jnp.cumsum(nb)
    j = jnp.arange(-(-num_tokens // block_q) + s, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(cum, j, side="right"), s - 1).astype(jnp.int32)
    i = j - (cum - nb)[seq]  # the block's index within its sequence
    return seq, query_start[seq] + i * block_q, jnp.clip(q_len[seq] - i * block_q, 0, block_q)


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
    block_q = query_block_size(t, query_start.shape[0] - 1)
    q_len = query_start[1:] - query_start[:-1]
    if block_q == 1:  # one token per block: the tokens themselves
        seq, valid = token_sequence_ids(query_start, t)
        tok = jnp.arange(t)  # [NQB]: no block axis
    else:
        seq, first, n = query_blocks(query_start, t, block_q)
        offs = jnp.arange(block_q)[None, :]
        tok, valid = first[:, None] + offs, offs < n[:, None]  # [NQB, block_q]
    per_block = (slice(None),) + (None,) * (tok.ndim - 1)  # a block's value on its tokens
    q_pos = (seq_lens[seq] - q_len[seq] - query_start[seq])[per_block] + tok  # new tokens: the last
    window = jnp.asarray(sliding_window)
    qg = q.reshape(t, hkv, g, d).astype(jnp.float32) * scale
    if block_q > 1:
        qg = qg[jnp.clip(tok, 0, t - 1)]  # [NQB, block_q, Hkv, G, D]
    nqb = qg.shape[0]
    c = max(1, CHUNK_TOKENS // bs)  # blocks per iteration
    tables = jnp.pad(block_tables, ((0, 0), (0, -block_tables.shape[1] % c)))[seq]  # [NQB, blocks]; 0: scratch
    chunk = c * bs

    def body(i, carry):
        m, l, acc = carry  # running max, sum of weights, weighted values: [NQB(, block_q), Hkv, G(, D)]
        blocks = jax.lax.dynamic_slice_in_dim(tables, i * c, c, axis=1)  # [NQB, c]

        def gather(pool, pool_scale):  # [NQB, c, Hkv, bs, D] -> [NQB, Hkv, c * bs, D], float32
            x = pool[layer, :, blocks].transpose(0, 2, 1, 3, 4).reshape(nqb, hkv, chunk, d)
            return dequantize_kv(x, None if pool_scale is None else pool_scale[layer], 1)

        k_pos = i * chunk + jnp.arange(chunk)
        mask = (k_pos <= q_pos[..., None]) & valid[..., None]  # causal (so within the context)
        mask = (mask & ((window <= 0) | (k_pos > q_pos[..., None] - window)))[..., None, None, :]
        scores = jnp.where(mask, jnp.einsum("j...hgd,jhkd->j...hgk", qg, gather(k_pool, k_scale)), MASK_VALUE)
        m_new = jnp.maximum(m, scores.max(-1))
        p = jnp.where(mask, jnp.exp(scores - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("j...hgk,jhkd->j...hgd", p, gather(v_pool, v_scale))
        return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv

    shape = qg.shape[:-1]
    init = (jnp.full(shape, MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(qg.shape, jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, (jnp.max(seq_lens) + chunk - 1) // chunk, body, init)
    out = (acc / jnp.where(l > 0, l, 1.0)[..., None]).reshape(-1, hq, d).astype(q.dtype)
    if block_q == 1:  # the tokens in order; padding tokens: 0 (no weights)
        return out
    rows = jnp.where(valid, tok, t).reshape(-1)  # padding: dropped, its rows stay 0
    return jnp.zeros((t, hq, d), q.dtype).at[rows].set(out, mode="drop")
