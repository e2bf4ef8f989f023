"""One program of the paged-attention kernels (`paged_attention_gpu.py`): what a (q-block, KV
head) program computes, shared by the per-sequence and the per-q-block kernels.

* Its rows are (query token, query head) pairs of ONE sequence and ONE KV head: `block_q`
  consecutive new tokens of the sequence times the `G = Hq // Hkv` query heads that share the
  KV head (GQA), G padded to a power of two `Gp`: `block_m = block_q * Gp` rows. Each K/V tile
  read from HBM serves every query head of its group.
* It walks the KV blocks of `block_n` keys that its rows can see (causal, sliding window), or
  one split-KV part of them, gathering the sequence's pages through the block table, with an
  online softmax in f32 (exp2). Blocks fully visible to every row run without the mask; only
  the causal diagonal and the window edge are masked.
* An fp8 pool's K/V tiles are converted after the load to f16 (Hopper converts e4m3 to f16 in
  one instruction, to bf16 only through f32), q (times the scores' scale first, so f16's range
  holds it) and the probabilities too, for 2-byte queries; the KV head's K scale is
  folded into the score scale and its V scale multiplies the output accumulator (one scalar
  each per program); other pools load no scales (static).

Refs: q [T, Hq, D]; k, v pools [L, Hkv, num_blocks, block_size, D]; block tables [S, max_blocks];
query_start [S + 1]; seq_lens [S]; out [T, Hq, D], or split-KV's f32 parts (`split_kv_merge.py`).
"""
from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxpaged.kernels.attention_tiles import kv_part, next_pow2

LOG2E = 1.4426950408889634
_NEG = -1e30  # finite initial running max: fully masked rows stay NaN-free


def attend_block(q_ref, k_ref, v_ref, bt_ref, sc_ref, out_refs, *, h, sp, s_c, layer, win, q_start, q_len, ctx,
                  tok0, n_tok, num_tokens, hq, group, group_p, block_q, block_n, block_size, max_blocks,
                  num_splits, scale_log2, padded_out, split_mask=True, min_split_keys=256, parts=1, scaled=False):
    """Attention of `n_tok` (<= block_q) new tokens from `tok0` of one sequence, one KV head."""
    block_m = block_q * group_p
    rows = lax.broadcasted_iota(jnp.int32, (block_m,), 0)
    ti = rows // group_p
    gi = rows % group_p
    row_ok = (ti < n_tok) & (gi < group)
    tok = q_start + tok0 + ti
    head = h * group + gi
    q_pos = ctx - q_len + tok0 + ti  # position of each row's token in its context
    tok_c = jnp.clip(tok, 0, num_tokens - 1)
    head_c = jnp.minimum(head, hq - 1)
    q = q_ref[tok_c, head_c, :]  # [block_m, D]
    score_scale = scale_log2
    if k_ref.dtype.itemsize == 1 and q.dtype.itemsize == 2:  # an fp8 pool: the dots in f16 (module docstring)
        q = (q.astype(jnp.float32) * scale_log2).astype(jnp.float16)  # the scores' scale first: f16's range
        score_scale = 1.0
    d = q.shape[-1]
    nl, hkv = k_ref.shape[:2]
    if scaled:  # an fp8 pool's scales of this KV head
        k_scale, v_scale = sc_ref[layer * hkv + h], sc_ref[(nl + layer) * hkv + h]
    else:
        k_scale, v_scale = 1.0, None
    score_scale = score_scale * k_scale

    p_first = ctx - q_len + tok0
    p_last = p_first + n_tok - 1
    kv_hi = jnp.where(n_tok > 0, p_last + 1, 0)  # exclusive; <= ctx
    kv_lo = jnp.where(win > 0, jnp.maximum(p_first - win + 1, 0), 0)
    blk_lo = kv_lo // block_n
    blk_hi = jnp.maximum((kv_hi + block_n - 1) // block_n, blk_lo)
    if num_splits > 1:
        b0, b1 = kv_part(blk_lo, blk_hi, sp, parts=parts, min_blocks=-(-min_split_keys // block_n))
    else:
        b0, b1 = blk_lo, blk_hi
    # Blocks in [u0, u1) are visible to every valid row: no mask there.
    w_full = jnp.where(win > 0, (jnp.maximum(p_last - win + 1, 0) + block_n - 1) // block_n, 0)
    c_full = (p_first + 1) // block_n
    if split_mask:
        u0 = jnp.clip(w_full, b0, b1)
        u1 = jnp.clip(c_full, u0, b1)
    else:  # one masked loop
        u0 = u1 = b1

    cols = lax.broadcasted_iota(jnp.int32, (block_n,), 0)

    def body(j, carry, masked):
        m_i, l_i, acc = carry
        k_pos = j * block_n + cols
        pages = bt_ref[s_c, jnp.minimum(k_pos // block_size, max_blocks - 1)]
        off = k_pos % block_size
        k = k_ref[layer, h, pages, off, :].astype(q.dtype)  # [block_n, D]; an fp8 pool's converted
        v = v_ref[layer, h, pages, off, :].astype(q.dtype)
        sc = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        sc = sc * score_scale
        if masked:
            mask = k_pos[None, :] <= q_pos[:, None]
            mask &= (win <= 0) | (k_pos[None, :] > q_pos[:, None] - win)
            sc = jnp.where(mask, sc, -jnp.inf)
        m_new = jnp.maximum(m_i, jnp.max(sc, axis=1))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(sc - m_new[:, None])
        l_new = l_i * alpha + jnp.sum(p, axis=1)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        return m_new, l_new, acc * alpha[:, None] + pv

    carry = (jnp.full((block_m,), _NEG, jnp.float32), jnp.zeros((block_m,), jnp.float32),
             jnp.zeros((block_m, d), jnp.float32))
    carry = lax.fori_loop(b0, u0, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(u0, u1, functools.partial(body, masked=False), carry)
    m_i, l_i, acc = lax.fori_loop(u1, b1, functools.partial(body, masked=True), carry)
    if v_scale is not None:
        acc = acc * v_scale

    if padded_out:
        # Interpret mode discharges a masked store as read-modify-write of every row, so
        # rows of one store must not alias: give each row its own (padded) slot.
        t_idx, h_idx = tok, h * group_p + gi
    else:  # on the GPU masked rows are simply not written
        t_idx, h_idx = tok_c, head_c
    dcols = lax.broadcasted_iota(jnp.int32, (d,), 0)
    full = lambda x: jnp.broadcast_to(x, (block_m, d))  # noqa: E731
    mask2 = full(row_ok[:, None])
    if num_splits == 1:
        (o_ref,) = out_refs
        out = acc / jnp.where(l_i == 0.0, 1.0, l_i)[:, None]
        idx = (full(t_idx[:, None]), full(h_idx[:, None]), full(dcols[None, :]))
        pltriton.store(o_ref.at[idx], out.astype(o_ref.dtype), mask=mask2)
    else:
        o_ref, m_ref, l_ref = out_refs
        spv = jnp.full((block_m,), sp, jnp.int32)
        idx3 = (full(spv[:, None]), full(t_idx[:, None]), full(h_idx[:, None]), full(dcols[None, :]))
        pltriton.store(o_ref.at[idx3], acc, mask=mask2)
        pltriton.store(m_ref.at[(spv, t_idx, h_idx)], m_i, mask=row_ok)
        pltriton.store(l_ref.at[(spv, t_idx, h_idx)], l_i, mask=row_ok)


def seq_info(qs_ref, lens_ref, s, num_seqs, num_tokens):
    """(q_start, q_len, ctx) of sequence s; s == num_seqs is the padding pseudo-sequence."""
    is_pad = s == num_seqs
    q_start = qs_ref[s]
    q_end = jnp.where(is_pad, num_tokens, qs_ref[jnp.minimum(s + 1, num_seqs)])
    ctx = jnp.where(is_pad, 0, lens_ref[jnp.minimum(s, num_seqs - 1)])
    return q_start, q_end - q_start, ctx, jnp.minimum(s, num_seqs - 1)


def seq_body(qs_ref, lens_ref, bt_ref, sc_ref, q_ref, k_ref, v_ref, out_refs, *, s, h, sp, layer, win, num_seqs,
              max_q_len, **kw):
    """Every q-block of sequence s (s == num_seqs: the padding tokens), one KV head, one split."""
    q_start, q_len, ctx, s_c = seq_info(qs_ref, lens_ref, s, num_seqs, kw["num_tokens"])
    if max_q_len is not None:  # the per-q-block kernel takes longer sequences and the padding
        q_len = jnp.where((q_len > max_q_len) | (s == num_seqs), 0, q_len)
    block_q = kw["block_q"]
    n_qb = (q_len + block_q - 1) // block_q

    def qblock(i, c):
        tok0 = i * block_q
        attend_block(q_ref, k_ref, v_ref, bt_ref, sc_ref, out_refs, h=h, sp=sp, s_c=s_c, layer=layer, win=win,
                      q_start=q_start, q_len=q_len, ctx=ctx, tok0=tok0,
                      n_tok=jnp.minimum(q_len - tok0, block_q), **kw)
        return c

    lax.fori_loop(0, n_qb, qblock, 0)


def qblock_body(qs_ref, lens_ref, bt_ref, sc_ref, q_ref, k_ref, v_ref, out_refs, *, qb, h, layer, win, num_seqs,
                 min_q_len, **kw):
    """q-block `qb` (vLLM-style numbering, see module doc) of whichever sequence owns it."""
    block_q = kw["block_q"]
    # Sequence of this q-block: the largest s with query_start[s] // block_q + s <= qb.
    sp2 = next_pow2(num_seqs + 1)
    if sp2 <= 4096:  # one vector load instead of a chain of dependent scalar loads
        idx = lax.broadcasted_iota(jnp.int32, (sp2,), 0)
        starts = qs_ref[jnp.minimum(idx, num_seqs)] // block_q + idx
        s = jnp.sum(((starts <= qb) & (idx <= num_seqs)).astype(jnp.int32)) - 1
    else:
        def search(_, c):
            lo, hi = c
            mid = (lo + hi + 1) // 2
            ok = qs_ref[mid] // block_q + mid <= qb
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

        s, _ = lax.fori_loop(0, math.ceil(math.log2(num_seqs + 1)) + 1, search,
                             (jnp.int32(0), jnp.int32(num_seqs)))
    q_start, q_len, ctx, s_c = seq_info(qs_ref, lens_ref, s, num_seqs, kw["num_tokens"])
    tok0 = (qb - (q_start // block_q + s)) * block_q
    n_tok = jnp.clip(q_len - tok0, 0, block_q)
    if min_q_len is not None:  # sequences this short went to the per-sequence kernel
        n_tok = jnp.where((q_len < min_q_len) & (s < num_seqs), 0, n_tok)
    # Most programs of a step with few sequences in a large bucket own no tokens (the grid's
    # slack for the padding sequences): they exit before loading their q tile.
    pl.when(n_tok > 0)(lambda: attend_block(
        q_ref, k_ref, v_ref, bt_ref, sc_ref, out_refs, h=h, sp=0, s_c=s_c, layer=layer, win=win, q_start=q_start,
        q_len=q_len, ctx=ctx, tok0=tok0, n_tok=n_tok, **kw))
