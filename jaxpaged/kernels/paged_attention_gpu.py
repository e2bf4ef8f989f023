"""Paged attention over a ragged batch as one Pallas kernel (Triton lowering) for the GPU.

Drop-in replacement for `paged_attention.paged_attention_ref` (same signature and
semantics; extra keyword-only tuning arguments). One kernel serves decode, prefill, chunked
prefill and mixed batches:

* Rows of a program are (query token, query head) pairs of ONE sequence and ONE KV head:
  `block_q` consecutive new tokens of the sequence times the `G = Hq // Hkv` query heads
  that share the KV head (GQA), padded to a power of two: `block_m = block_q * Gp` rows.
  So each K/V tile read from HBM serves every query head of its group.
* Grid `(q_blocks, Hkv, num_splits)`. q-blocks are assigned per sequence the way vLLM's
  unified attention does: sequence `s` owns the q-block indices starting at
  `query_start[s] // block_q + s`, so `cdiv(T, block_q) + S` q-blocks cover any ragged
  batch; a program finds its sequence by binary search over `query_start` in the kernel.
  Tokens past `query_start[-1]` (padding) form one more pseudo-sequence with no context,
  so every output row is written (zeros there) and nothing needs a post-pass.
* Each program walks the KV blocks of `block_n` keys that its rows can see (causal, and
  the sliding window if any), gathering the pages of its sequence through the block table,
  with an online softmax in f32 (exp2). With `num_splits > 1` the visible KV range is cut
  into `num_splits` contiguous parts (split-KV / flash-decoding) whose partial results are
  merged by a small XLA fusion afterwards.

The pool layout is the reference's `[L, Hkv, num_blocks, block_size, D]`; the layer index is
read in the kernel, so no layer slice is ever copied.
"""
from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

LOG2E = 1.4426950408889634
_NEG = -1e30  # finite initial running max: fully masked rows stay NaN-free

# Every Triton lowering warns in JAX >= 0.11 ("The Pallas Triton backend is deprecated").
warnings.filterwarnings("ignore", message=".*[Tt]riton.*deprecated.*")


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _default_backend() -> str:
    return jax.default_backend()


def choose_config(t: int, s: int, hq: int, hkv: int, d: int, max_ctx: int) -> dict:
    """Static tuning heuristic from the static shapes (T tokens, S sequences)."""
    g = _next_pow2(hq // hkv)
    decode_like = t <= 2 * s  # mostly one token per sequence
    if decode_like:
        block_m = max(16, g)
        block_n = 64 if d <= 128 else 32
        # Enough programs to fill the GPU (132 SMs, a few programs each) without
        # splitting short contexts into empty pieces.
        progs = max(1, s * hkv)
        num_splits = 1
        while progs * num_splits < 1024 and max_ctx >= num_splits * 2 * 512:
            num_splits *= 2
        num_warps, num_stages = 4, 3
    else:
        block_m = max(128, g) if d <= 128 else max(64, g)
        block_n = 64
        num_splits = 1
        num_warps, num_stages = 8, 3
    return dict(block_m=block_m, block_n=block_n, num_splits=num_splits,
                num_warps=num_warps, num_stages=num_stages)


def _kernel(qs_ref, lens_ref, bt_ref, layer_ref, win_ref, q_ref, k_ref, v_ref, *out_refs,
            num_seqs, num_tokens, hq, group, group_p, block_q, block_n, block_size,
            max_blocks, num_splits, scale_log2, search_steps, padded_out):
    s_max = num_seqs  # the padding pseudo-sequence
    block_m = block_q * group_p
    qb = pl.program_id(0)
    h = pl.program_id(1)
    sp = pl.program_id(2)

    # Sequence of this q-block: the largest s with query_start[s] // block_q + s <= qb.
    def search(_, c):
        lo, hi = c
        mid = (lo + hi + 1) // 2
        ok = qs_ref[mid] // block_q + mid <= qb
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    s, _ = lax.fori_loop(0, search_steps, search, (jnp.int32(0), jnp.int32(s_max)))
    is_pad = s == s_max
    q_start = qs_ref[s]
    q_end = jnp.where(is_pad, num_tokens, qs_ref[jnp.minimum(s + 1, s_max)])
    s_c = jnp.minimum(s, num_seqs - 1)
    ctx = jnp.where(is_pad, 0, lens_ref[s_c])
    q_len = q_end - q_start
    tok0 = (qb - (q_start // block_q + s)) * block_q
    n_tok = jnp.clip(q_len - tok0, 0, block_q)

    rows = lax.broadcasted_iota(jnp.int32, (block_m,), 0)
    ti = rows // group_p
    gi = rows % group_p
    row_ok = (ti < n_tok) & (gi < group)
    tok = q_start + tok0 + ti
    head = h * group + gi
    q_pos = ctx - q_len + tok0 + ti  # position of each row's token in its context
    tok_c = jnp.minimum(tok, num_tokens - 1)
    head_c = jnp.minimum(head, hq - 1)
    q = q_ref[tok_c, head_c, :]  # [block_m, D]

    layer = layer_ref[0]
    win = win_ref[0]
    p_first = ctx - q_len + tok0
    kv_hi = jnp.where(n_tok > 0, p_first + n_tok, 0)  # exclusive; <= ctx
    kv_lo = jnp.where(win > 0, jnp.maximum(p_first - win + 1, 0), 0)
    blk_lo = kv_lo // block_n
    blk_hi = jnp.maximum((kv_hi + block_n - 1) // block_n, blk_lo)
    if num_splits > 1:
        per = (blk_hi - blk_lo + num_splits - 1) // num_splits
        b0 = jnp.minimum(blk_lo + sp * per, blk_hi)
        b1 = jnp.minimum(b0 + per, blk_hi)
    else:
        b0, b1 = blk_lo, blk_hi

    cols = lax.broadcasted_iota(jnp.int32, (block_n,), 0)
    d = q.shape[-1]

    def body(j, carry):
        m_i, l_i, acc = carry
        k_pos = j * block_n + cols
        pages = bt_ref[s_c, jnp.minimum(k_pos // block_size, max_blocks - 1)]
        off = k_pos % block_size
        k = k_ref[layer, h, pages, off, :]  # [block_n, D]
        v = v_ref[layer, h, pages, off, :]
        sc = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        sc = sc * scale_log2
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

    m0 = jnp.full((block_m,), _NEG, jnp.float32)
    l0 = jnp.zeros((block_m,), jnp.float32)
    a0 = jnp.zeros((block_m, d), jnp.float32)
    m_i, l_i, acc = lax.fori_loop(b0, b1, body, (m0, l0, a0))

    if padded_out:
        # Interpret mode discharges a masked store as read-modify-write of every row, so
        # rows of one store must not alias: give each row its own (padded) slot.
        t_idx, h_idx = tok, h * group_p + gi
    else:  # on the GPU masked rows are simply not written
        t_idx, h_idx = tok_c, head_c
    dcols = lax.broadcasted_iota(jnp.int32, (d,), 0)
    if num_splits == 1:
        (o_ref,) = out_refs
        out = acc / jnp.where(l_i == 0.0, 1.0, l_i)[:, None]
        idx = tuple(jnp.broadcast_to(i, (block_m, d)) for i in (t_idx[:, None], h_idx[:, None], dcols[None, :]))
        pltriton.store(o_ref.at[idx], out.astype(o_ref.dtype), mask=jnp.broadcast_to(row_ok[:, None], (block_m, d)))
    else:
        o_ref, m_ref, l_ref = out_refs
        spv = jnp.full((block_m,), sp, jnp.int32)
        idx3 = tuple(jnp.broadcast_to(i, (block_m, d))
                     for i in (spv[:, None], t_idx[:, None], h_idx[:, None], dcols[None, :]))
        idx2 = (spv, t_idx, h_idx)
        pltriton.store(o_ref.at[idx3], acc, mask=jnp.broadcast_to(row_ok[:, None], (block_m, d)))
        pltriton.store(m_ref.at[idx2], m_i, mask=row_ok)
        pltriton.store(l_ref.at[idx2], l_i, mask=row_ok)


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
    block_m: int | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Same contract as `paged_attention_ref`; see the module docstring for the design.

    Tuning args default to `choose_config(...)`. `block_m` is the number of (token, head)
    rows per program (a power of two >= the padded GQA group), `block_n` the keys per
    inner step. `interpret` defaults to True off-GPU (Pallas interpret mode).
    """
    t, hq, d = q.shape
    nl, hkv, nb, bs, d2 = k_pool.shape
    assert d == d2 and hq % hkv == 0, (q.shape, k_pool.shape)
    assert d == _next_pow2(d), f"head dim {d} must be a power of two"
    s, mb = block_tables.shape
    assert query_start.shape == (s + 1,) and seq_lens.shape == (s,)
    group = hq // hkv
    group_p = _next_pow2(group)
    cfg = choose_config(t, s, hq, hkv, d, mb * bs)
    block_m = block_m or cfg["block_m"]
    block_n = block_n or cfg["block_n"]
    num_splits = num_splits or cfg["num_splits"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    assert block_m == _next_pow2(block_m) and block_m >= group_p, (block_m, group_p)
    assert block_n == _next_pow2(block_n)
    if interpret is None:
        interpret = _default_backend() != "gpu"
    block_q = block_m // group_p
    grid_q = -(-t // block_q) + s

    i32 = jnp.int32
    layer_a = jnp.reshape(jnp.asarray(layer, i32), (1,))
    win_a = jnp.reshape(jnp.asarray(sliding_window, i32), (1,))
    padded_out = bool(interpret)
    t_out = t + 2 * block_q if padded_out else t
    h_out = hkv * group_p if padded_out else hq

    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((t_out, h_out, d), q.dtype)]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((num_splits, t_out, h_out, d), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, t_out, h_out), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, t_out, h_out), jnp.float32),
        ]
    kernel = functools.partial(
        _kernel, num_seqs=s, num_tokens=t, hq=hq, group=group, group_p=group_p, block_q=block_q,
        block_n=block_n, block_size=bs, max_blocks=mb, num_splits=num_splits,
        scale_log2=float(scale) * LOG2E, search_steps=max(1, math.ceil(math.log2(s + 1))) + 1,
        padded_out=padded_out,
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(grid_q, hkv, num_splits),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_attention_gpu",
    )(query_start.astype(i32), seq_lens.astype(i32), block_tables.astype(i32), layer_a, win_a,
      q, k_pool, v_pool)

    if num_splits == 1:
        out = outs[0]
    else:
        o, m, l = outs
        m_all = jnp.max(m, axis=0)
        w = jnp.exp2(m - m_all[None])  # [splits, T, H]
        l_all = jnp.sum(w * l, axis=0)
        out = jnp.sum(w[..., None] * o, axis=0) / jnp.where(l_all == 0.0, 1.0, l_all)[..., None]
        out = out.astype(q.dtype)
    if padded_out:
        out = out[:t].reshape(t, hkv, group_p, d)[:, :, :group].reshape(t, hq, d)
    return out
