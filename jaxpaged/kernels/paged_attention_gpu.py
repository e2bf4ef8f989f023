"""Paged attention over a ragged batch as Pallas kernels (Triton lowering) for the GPU.

Drop-in replacement for `paged_attention.paged_attention_ref` (same signature and
semantics; extra keyword-only tuning arguments). Design (see docs/kernels.md):

* Rows of a program are (query token, query head) pairs of ONE sequence and ONE KV head:
  `block_q` consecutive new tokens of the sequence times the `G = Hq // Hkv` query heads
  that share the KV head (GQA), G padded to a power of two `Gp`: `block_m = block_q * Gp`
  rows. Each K/V tile read from HBM serves every query head of its group.
* The program walks the KV blocks of `block_n` keys that its rows can see (causal, sliding
  window), gathering the sequence's pages through the block table, with an online softmax
  in f32 (exp2). Blocks fully visible to every row run without the mask; only the causal
  diagonal and the window edge are masked.
* Two kernels share that body:
  - per-sequence ("decode") kernel, grid `(slots + 1, Hkv)`: a program handles every q-block
    of one sequence (the last slot: the padding tokens past `query_start[-1]`), with small
    tiles (`block_m` 16), or with split-KV one contiguous part of its visible KV range
    (flash-decoding), the parts merged by a second kernel (`split_kv_merge.py`). The part
    count comes from the step's live sequences (at most `programs` programs in all, at most
    `num_splits` parts; counted once a call and passed in with the layer index), and the slots
    map to the live sequences' parts only, so a lone long sequence in a padded bucket streams
    its KV on every SM and padding sequences take no programs; a part has at least
    `min_split_keys` keys (short contexts fill fewer).
  - per-q-block ("prefill") kernel, grid `(cdiv(T, block_q) + S + 1, Hkv)`: q-blocks are
    assigned per sequence the way vLLM's unified attention does (sequence `s` owns the
    q-block indices from `query_start[s] // block_q + s`), with big tiles (`block_m` 128).
  A batch whose queries are all short (static: `T` or the caller's `max_query_len` at most
  `DECODE_ONLY_MAX_TOKENS`) runs the per-sequence kernel alone (split-KV for small batches).
  Other batches run both in one fused launch: the per-sequence kernel takes the sequences with at most
  `block_q_decode` new tokens, the per-q-block kernel the rest and the padding, writing
  into the first one's output in place (`input_output_aliases`). So a mixed batch costs
  about its decode part plus its prefill part.

The pool layout is the reference's `[L, Hkv, num_blocks, block_size, D]`; the layer index is
read in the kernel, so no layer slice is ever copied. An fp8 pool's K/V tiles are converted to
q's dtype after the load; the program's KV head's K scale is folded into the score scale and
its V scale multiplies the output accumulator (one scalar each per program); other pools load
no scales (static).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxpaged.kernels.attention_tiles import (DECODE_ONLY_MAX_TOKENS, TileConfig, choose_config, kv_part, next_pow2,
                                              num_sms, split_parts, work_slots)
from jaxpaged.kernels.split_kv_merge import merge_parts

LOG2E = 1.4426950408889634
_NEG = -1e30  # finite initial running max: fully masked rows stay NaN-free
# Every Triton lowering warns in JAX >= 0.11 ("The Pallas Triton backend is deprecated").
warnings.filterwarnings("ignore", message=".*[Tt]riton.*deprecated.*")


@functools.lru_cache(maxsize=None)
def _default_backend() -> str:
    return jax.default_backend()


def _attend_block(q_ref, k_ref, v_ref, bt_ref, sc_ref, out_refs, *, h, sp, s_c, layer, win, q_start, q_len, ctx,
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
    d = q.shape[-1]
    nl, hkv = k_ref.shape[:2]
    if scaled:  # an fp8 pool's scales of this KV head
        k_scale, v_scale = sc_ref[layer * hkv + h], sc_ref[(nl + layer) * hkv + h]
    else:
        k_scale, v_scale = 1.0, None
    score_scale = scale_log2 * k_scale

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


def _seq_info(qs_ref, lens_ref, s, num_seqs, num_tokens):
    """(q_start, q_len, ctx) of sequence s; s == num_seqs is the padding pseudo-sequence."""
    is_pad = s == num_seqs
    q_start = qs_ref[s]
    q_end = jnp.where(is_pad, num_tokens, qs_ref[jnp.minimum(s + 1, num_seqs)])
    ctx = jnp.where(is_pad, 0, lens_ref[jnp.minimum(s, num_seqs - 1)])
    return q_start, q_end - q_start, ctx, jnp.minimum(s, num_seqs - 1)


def _seq_body(qs_ref, lens_ref, bt_ref, sc_ref, q_ref, k_ref, v_ref, out_refs, *, s, h, sp, layer, win, num_seqs,
              max_q_len, **kw):
    """Every q-block of sequence s (s == num_seqs: the padding tokens), one KV head, one split."""
    q_start, q_len, ctx, s_c = _seq_info(qs_ref, lens_ref, s, num_seqs, kw["num_tokens"])
    if max_q_len is not None:  # the per-q-block kernel takes longer sequences and the padding
        q_len = jnp.where((q_len > max_q_len) | (s == num_seqs), 0, q_len)
    block_q = kw["block_q"]
    n_qb = (q_len + block_q - 1) // block_q

    def qblock(i, c):
        tok0 = i * block_q
        _attend_block(q_ref, k_ref, v_ref, bt_ref, sc_ref, out_refs, h=h, sp=sp, s_c=s_c, layer=layer, win=win,
                      q_start=q_start, q_len=q_len, ctx=ctx, tok0=tok0,
                      n_tok=jnp.minimum(q_len - tok0, block_q), **kw)
        return c

    lax.fori_loop(0, n_qb, qblock, 0)


def _qblock_body(qs_ref, lens_ref, bt_ref, sc_ref, q_ref, k_ref, v_ref, out_refs, *, qb, h, layer, win, num_seqs,
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
    q_start, q_len, ctx, s_c = _seq_info(qs_ref, lens_ref, s, num_seqs, kw["num_tokens"])
    tok0 = (qb - (q_start // block_q + s)) * block_q
    n_tok = jnp.clip(q_len - tok0, 0, block_q)
    if min_q_len is not None:  # sequences this short went to the per-sequence kernel
        n_tok = jnp.where((q_len < min_q_len) & (s < num_seqs), 0, n_tok)
    # Most programs of a step with few sequences in a large bucket own no tokens (the grid's
    # slack for the padding sequences): they exit before loading their q tile.
    pl.when(n_tok > 0)(lambda: _attend_block(
        q_ref, k_ref, v_ref, bt_ref, sc_ref, out_refs, h=h, sp=0, s_c=s_c, layer=layer, win=win, q_start=q_start,
        q_len=q_len, ctx=ctx, tok0=tok0, n_tok=n_tok, **kw))


def _split_refs(rest, has_prev):
    return rest[1:] if has_prev else rest


def _seq_kernel(qs_ref, lens_ref, bt_ref, step_ref, sc_ref, q_ref, k_ref, v_ref, *rest, has_prev, slots, **kw):
    """Grid (slots + 1, Hkv): program (w, h) does every q-block of one part of one sequence; the
    last slot, the padding tokens. Without split-KV a slot is a sequence. With it, each of the
    step's live sequences (the first ones: padding sequences come last) gets `parts`
    consecutive slots, so only the live sequences' parts take programs."""
    w, h, num_seqs = pl.program_id(0), pl.program_id(1), kw["num_seqs"]
    refs = (qs_ref, lens_ref, bt_ref, sc_ref, q_ref, k_ref, v_ref, _split_refs(rest, has_prev))
    layer, win, live, parts = step_ref[0], step_ref[1], step_ref[2], step_ref[3]
    if kw["num_splits"] == 1:
        return _seq_body(*refs, s=w, h=h, sp=0, layer=layer, win=win, **kw)
    pad = w == slots
    s, sp = jnp.where(pad, num_seqs, w // parts), jnp.where(pad, 0, w % parts)
    pl.when(pad | (s < live))(lambda: _seq_body(*refs, s=s, h=h, sp=sp, layer=layer, win=win, parts=parts, **kw))


def _qblock_kernel(qs_ref, lens_ref, bt_ref, step_ref, sc_ref, q_ref, k_ref, v_ref, *rest, has_prev,
                   num_q_blocks, heavy_first, **kw):
    """Grid (q-blocks, Hkv): program (qb, h) does one q-block of one sequence."""
    pid = pl.program_id(0)
    qb = num_q_blocks - 1 - pid if heavy_first else pid
    _qblock_body(qs_ref, lens_ref, bt_ref, sc_ref, q_ref, k_ref, v_ref, _split_refs(rest, has_prev), qb=qb,
                 h=pl.program_id(1), layer=step_ref[0], win=step_ref[1], **kw)


def _fused_kernel(qs_ref, lens_ref, bt_ref, step_ref, sc_ref, q_ref, k_ref, v_ref, o_ref, *, num_q_blocks,
                  heavy_first, seq_kw, qblock_kw):
    """Grid (q-blocks + S, Hkv): the per-q-block programs (long queries, padding), then one
    per-sequence program for each sequence with few new tokens; one launch for a mixed batch."""
    pid, h = pl.program_id(0), pl.program_id(1)  # (outside the branches: interpret mode)
    layer, win = step_ref[0], step_ref[1]
    refs = (qs_ref, lens_ref, bt_ref, sc_ref, q_ref, k_ref, v_ref, (o_ref,))

    def qblock():
        qb = num_q_blocks - 1 - pid if heavy_first else pid
        _qblock_body(*refs, qb=qb, h=h, layer=layer, win=win, **qblock_kw)

    def seq():
        _seq_body(*refs, s=pid - num_q_blocks, h=h, sp=0, layer=layer, win=win, **seq_kw)

    lax.cond(pid < num_q_blocks, qblock, seq)


def paged_attention_gpu(
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
    mode: str = "auto",
    decode_config: TileConfig | None = None,
    prefill_config: TileConfig | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Same contract as `paged_attention_ref`; see the module docstring for the design.

    `max_query_len`: a static bound on any sequence's new tokens (None: T), as in vLLM's
    attention metadata. `mode`: "auto" ("decode" when that bound or T is at most
    DECODE_ONLY_MAX_TOKENS, else "fused"), "decode" (per-sequence kernel
    alone), "prefill" (per-q-block kernel alone), "split" (both, two launches) or "fused"
    (both in one launch; the per-sequence part without split-KV).
    Configs default to `choose_config(...)`; `block_m`, `block_n`, `num_splits`,
    `num_warps`, `num_stages` override fields of both. `interpret` defaults to True off-GPU.
    `k_scale`, `v_scale` [L, Hkv]: an fp8 pool's dequantization scales.
    """
    t, hq, d = q.shape
    nl, hkv, nb, bs, d2 = k_pool.shape
    assert d == d2 and hq % hkv == 0, (q.shape, k_pool.shape)
    assert d == next_pow2(d), f"head dim {d} must be a power of two"
    s, mb = block_tables.shape
    assert query_start.shape == (s + 1,) and seq_lens.shape == (s,)
    group = hq // hkv
    group_p = next_pow2(group)
    dec, pre = choose_config(t, s, hq, hkv, d, mb * bs)
    dec, pre = decode_config or dec, prefill_config or pre
    over = {k: v for k, v in dict(block_m=block_m, block_n=block_n, num_splits=num_splits,
                                  num_warps=num_warps, num_stages=num_stages).items() if v}
    dec = dataclasses.replace(dec, **over)
    pre = dataclasses.replace(pre, **{k: v for k, v in over.items() if k != "num_splits"})
    pre = dataclasses.replace(pre, num_splits=1)
    for c in (dec, pre):
        assert c.block_m == next_pow2(c.block_m) and c.block_m >= group_p, (c, group_p)
        assert c.block_n == next_pow2(c.block_n), c
    if mode == "auto":
        mode = "decode" if min(t, max_query_len or t) <= DECODE_ONLY_MAX_TOKENS else "fused"
    assert mode in ("decode", "prefill", "split", "fused"), mode
    if interpret is None:
        interpret = _default_backend() != "gpu"
    padded_out = bool(interpret)
    bq_dec, bq_pre = dec.block_m // group_p, pre.block_m // group_p
    t_out = t + 2 * max(bq_dec, bq_pre) if padded_out else t
    h_out = hkv * group_p if padded_out else hq

    i32 = jnp.int32
    # an fp8 pool's scales, flat: K's [L * Hkv] then V's (ones for other pools)
    kv_scales = jnp.concatenate([jnp.ones(nl * hkv, jnp.float32) if x is None else x.astype(jnp.float32).reshape(-1)
                                 for x in (k_scale, v_scale)])
    # split-KV's parts of each of the step's live sequences (they come first; padding ones last)
    programs = dec.programs or 2 * num_sms()
    live = jnp.maximum(jnp.sum((seq_lens > 0).astype(i32)), 1)
    parts = split_parts(live, hkv, programs, dec.num_splits)
    step = jnp.stack([jnp.asarray(x, i32) for x in (layer, sliding_window, live, parts)])  # [4]
    scalars = (query_start.astype(i32), seq_lens.astype(i32), block_tables.astype(i32), step, kv_scales)
    common = dict(num_seqs=s, num_tokens=t, hq=hq, group=group, group_p=group_p, block_size=bs,
                  max_blocks=mb, scale_log2=float(scale) * LOG2E, padded_out=padded_out,
                  scaled=k_scale is not None or v_scale is not None)

    def params(c):
        return pltriton.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages)

    out = None
    if mode == "fused":
        c = pre
        grid_q = -(-t // bq_pre) + s + 1
        seq_kw = dict(common, max_q_len=bq_dec, block_q=bq_dec, block_n=dec.block_n, num_splits=1,
                      split_mask=dec.split_mask)
        qblock_kw = dict(common, min_q_len=bq_dec + 1, block_q=bq_pre, block_n=pre.block_n, num_splits=1,
                         split_mask=pre.split_mask)
        kern = functools.partial(_fused_kernel, num_q_blocks=grid_q, heavy_first=pre.heavy_first,
                                 seq_kw=seq_kw, qblock_kw=qblock_kw)
        out = pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((t_out, h_out, d), q.dtype),
                             grid=(grid_q + s, hkv), compiler_params=params(c), interpret=interpret,
                             name="paged_attention_fused")(*scalars, q, k_pool, v_pool)
    if mode in ("decode", "split"):
        c = dec
        slots = work_slots(s, hkv, programs, c.num_splits)
        kern = functools.partial(_seq_kernel, max_q_len=bq_dec if mode == "split" else None, has_prev=False,
                                 block_q=bq_dec, block_n=c.block_n, num_splits=c.num_splits,
                                 split_mask=c.split_mask, min_split_keys=c.min_split_keys, slots=slots, **common)
        if c.num_splits == 1:
            shapes = [jax.ShapeDtypeStruct((t_out, h_out, d), q.dtype)]
        else:
            shapes = [jax.ShapeDtypeStruct((c.num_splits, t_out, h_out, d), jnp.float32),
                      jax.ShapeDtypeStruct((c.num_splits, t_out, h_out), jnp.float32),
                      jax.ShapeDtypeStruct((c.num_splits, t_out, h_out), jnp.float32)]
        outs = pl.pallas_call(kern, out_shape=shapes, grid=(slots + 1, hkv),
                              compiler_params=params(c), interpret=interpret, name="paged_attention_seq",
                              )(*scalars, q, k_pool, v_pool)
        if c.num_splits == 1:
            out = outs[0]
        else:
            out = merge_parts(*outs, query_start, step, num_seqs=s, dtype=q.dtype, interpret=interpret)
    if mode in ("prefill", "split"):
        c = pre
        grid_q = -(-t // bq_pre) + s + 1
        has_prev = out is not None
        kern = functools.partial(_qblock_kernel, min_q_len=bq_dec + 1 if has_prev else None,
                                 num_q_blocks=grid_q, heavy_first=c.heavy_first, has_prev=has_prev,
                                 block_q=bq_pre, block_n=c.block_n, num_splits=1, split_mask=c.split_mask,
                                 **common)
        args = (*scalars, q, k_pool, v_pool) + ((out,) if has_prev else ())
        out = pl.pallas_call(kern, out_shape=[jax.ShapeDtypeStruct((t_out, h_out, d), q.dtype)],
                             grid=(grid_q, hkv), compiler_params=params(c), interpret=interpret,
                             input_output_aliases={8: 0} if has_prev else {}, name="paged_attention_qblock",
                             )(*args)[0]
    if padded_out:
        out = out[:t].reshape(t, hkv, group_p, d)[:, :, :group].reshape(t, hq, d)
    return out
