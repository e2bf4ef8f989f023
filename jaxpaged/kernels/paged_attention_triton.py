"""The per-q-block ("prefill") paged-attention kernel in Triton, called through jax-triton.

Same rows, q-block numbering, masking and online softmax as the Pallas per-q-block kernel
(kernels/paged_attention_gpu.py): a program is `block_q` new tokens of one sequence times the
`Gp` query heads of one KV head, walking the sequence's pages through the block table. It is
compiled by the `triton` package rather than by XLA's Triton pipeline, so on Hopper its dots
can be wgmma instructions; that is the whole reason it exists (docs/kernels.md).

q: [T, Hq, D]; k_pool, v_pool: [L, Hkv, num_blocks, block_size, D] (bf16, f16 or fp8 with
scales); query_start: [S + 1]; seq_lens: [S]; block_tables: [S, max_blocks]; out: [T, Hq, D].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_SEQS = 4095  # the sequence of a q-block is found with one vector load of query_start


@triton.jit
def _kv_step(j, q, m_i, l_i, acc, k_base, v_base, bt_row, q_pos, win, score_scale, cols, dcols,
             BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, MAX_BLOCKS: tl.constexpr,
             S_KB: tl.constexpr, S_KS: tl.constexpr, MASKED: tl.constexpr):
    """One tile of `BLOCK_N` keys from key j * BLOCK_N: online-softmax update of (m, l, acc)."""
    k_pos = j * BLOCK_N + cols
    pages = tl.load(bt_row + tl.minimum(k_pos // BLOCK_SIZE, MAX_BLOCKS - 1)).to(tl.int64)
    off = pages * S_KB + (k_pos % BLOCK_SIZE) * S_KS  # [BLOCK_N]
    k = tl.load(k_base + off[None, :] + dcols[:, None]).to(q.dtype)  # [D, BLOCK_N]
    v = tl.load(v_base + off[:, None] + dcols[None, :]).to(q.dtype)  # [BLOCK_N, D]
    sc = tl.dot(q, k) * score_scale
    if MASKED:
        mask = (k_pos[None, :] <= q_pos[:, None]) & ((win <= 0) | (k_pos[None, :] > q_pos[:, None] - win))
        sc = tl.where(mask, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(sc - m_new[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
    return m_new, l_new, acc


@triton.jit
def prefill_kernel(QS, LENS, BT, LAYER, WIN, SC, Q, K, V, PREV, O,
            NUM_SEQS: tl.constexpr, NUM_TOKENS: tl.constexpr, NUM_Q_BLOCKS: tl.constexpr, HQ: tl.constexpr,
            HKV: tl.constexpr, NL: tl.constexpr, MIN_Q_LEN: tl.constexpr, SCALE_LOG2: tl.constexpr,
            GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_SIZE: tl.constexpr, MAX_BLOCKS: tl.constexpr, D: tl.constexpr, SEQ_P2: tl.constexpr,
            SCALED: tl.constexpr, HEAVY_FIRST: tl.constexpr, S_QT: tl.constexpr, S_QH: tl.constexpr,
            S_KL: tl.constexpr, S_KH: tl.constexpr, S_KB: tl.constexpr, S_KS: tl.constexpr,
            S_OT: tl.constexpr, S_OH: tl.constexpr):
    """Program (qb, h): q-block qb of whichever sequence owns it (sequence s owns the indices
    from query_start[s] // BLOCK_Q + s; s == NUM_SEQS is the padding), KV head h. PREV: the
    output that O aliases (the per-sequence kernel's rows kept), or any array (unused)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    qb = NUM_Q_BLOCKS - 1 - pid if HEAVY_FIRST else pid
    idx = tl.arange(0, SEQ_P2)
    starts = tl.load(QS + tl.minimum(idx, NUM_SEQS)) // BLOCK_Q + idx
    s = tl.sum(((starts <= qb) & (idx <= NUM_SEQS)).to(tl.int32), 0) - 1
    is_pad = s == NUM_SEQS
    s_c = tl.minimum(s, NUM_SEQS - 1)
    q_start = tl.load(QS + s)
    q_len = tl.where(is_pad, NUM_TOKENS, tl.load(QS + tl.minimum(s + 1, NUM_SEQS))) - q_start
    ctx = tl.where(is_pad, 0, tl.load(LENS + s_c))
    tok0 = (qb - (q_start // BLOCK_Q + s)) * BLOCK_Q
    n_tok = tl.minimum(tl.maximum(q_len - tok0, 0), BLOCK_Q)
    if MIN_Q_LEN > 0:  # shorter sequences went to the per-sequence kernel
        n_tok = tl.where((q_len < MIN_Q_LEN) & (s < NUM_SEQS), 0, n_tok)
    if n_tok > 0:
        layer = tl.load(LAYER).to(tl.int64)
        win = tl.load(WIN)
        rows = tl.arange(0, BLOCK_Q * GROUP_P)
        ti = rows // GROUP_P
        gi = rows % GROUP_P
        row_ok = (ti < n_tok) & (gi < GROUP)
        tok = tl.minimum(q_start + tok0 + ti, NUM_TOKENS - 1).to(tl.int64)
        head = tl.minimum(h * GROUP + gi, HQ - 1)
        q_pos = ctx - q_len + tok0 + ti
        dcols = tl.arange(0, D)
        q = tl.load(Q + tok[:, None] * S_QT + head[:, None] * S_QH + dcols[None, :])
        if SCALED:
            k_scale = tl.load(SC + layer * HKV + h)
            v_scale = tl.load(SC + (NL + layer) * HKV + h)
        else:
            k_scale = 1.0
            v_scale = 1.0
        score_scale = SCALE_LOG2 * k_scale

        p_first = ctx - q_len + tok0
        p_last = p_first + n_tok - 1
        kv_lo = tl.where(win > 0, tl.maximum(p_first - win + 1, 0), 0)
        b0 = kv_lo // BLOCK_N
        b1 = tl.maximum((p_last + BLOCK_N) // BLOCK_N, b0)
        # tiles in [u0, u1) are visible to every row: no mask there
        w_full = tl.where(win > 0, (tl.maximum(p_last - win + 1, 0) + BLOCK_N - 1) // BLOCK_N, 0)
        u0 = tl.minimum(tl.maximum(w_full, b0), b1)
        u1 = tl.minimum(tl.maximum((p_first + 1) // BLOCK_N, u0), b1)

        kv_off = layer * S_KL + h.to(tl.int64) * S_KH
        k_base = K + kv_off
        v_base = V + kv_off
        bt_row = BT + s_c * MAX_BLOCKS
        cols = tl.arange(0, BLOCK_N)
        m_i = tl.full([BLOCK_Q * GROUP_P], -1e30, tl.float32)
        l_i = tl.zeros([BLOCK_Q * GROUP_P], tl.float32)
        acc = tl.zeros([BLOCK_Q * GROUP_P, D], tl.float32)
        for j in range(b0, u0):
            m_i, l_i, acc = _kv_step(j, q, m_i, l_i, acc, k_base, v_base, bt_row, q_pos, win, score_scale, cols,
                                     dcols, BLOCK_N, BLOCK_SIZE, MAX_BLOCKS, S_KB, S_KS, True)
        for j in range(u0, u1):
            m_i, l_i, acc = _kv_step(j, q, m_i, l_i, acc, k_base, v_base, bt_row, q_pos, win, score_scale, cols,
                                     dcols, BLOCK_N, BLOCK_SIZE, MAX_BLOCKS, S_KB, S_KS, False)
        for j in range(u1, b1):
            m_i, l_i, acc = _kv_step(j, q, m_i, l_i, acc, k_base, v_base, bt_row, q_pos, win, score_scale, cols,
                                     dcols, BLOCK_N, BLOCK_SIZE, MAX_BLOCKS, S_KB, S_KS, True)
        out = acc * v_scale / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + tok[:, None] * S_OT + head[:, None] * S_OH + dcols[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None])



def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def kernel_meta(q_shape: tuple, pool_shape: tuple, num_seqs: int, max_blocks: int, *, scale: float, scaled: bool,
                min_q_len: int = 0, block_m: int = 128, block_n: int = 64, heavy_first: bool = True) -> dict:
    """`prefill_kernel`'s constexprs for row-major q [T, Hq, D], pools [L, Hkv, NB, BS, D] and out
    like q, plus its grid (key "grid")."""
    t, hq, d = q_shape
    nl, hkv, nb, bs, _ = pool_shape
    group = hq // hkv
    group_p = _next_pow2(group)
    block_q = block_m // group_p
    if num_seqs > MAX_SEQS or block_q < 1:
        raise ValueError(f"triton prefill kernel: {num_seqs} sequences (at most {MAX_SEQS}), block_m {block_m} "
                         f"for {group_p} heads per KV head")
    num_q_blocks = -(-t // block_q) + num_seqs + 1
    return dict(grid=(num_q_blocks, hkv), NUM_SEQS=num_seqs, NUM_TOKENS=t, NUM_Q_BLOCKS=num_q_blocks, HQ=hq,
                HKV=hkv, NL=nl, MIN_Q_LEN=min_q_len, SCALE_LOG2=float(scale) * LOG2E, GROUP=group,
                GROUP_P=group_p, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_SIZE=bs, MAX_BLOCKS=max_blocks, D=d,
                SEQ_P2=_next_pow2(num_seqs + 1), SCALED=scaled, HEAVY_FIRST=heavy_first, S_QT=hq * d, S_QH=d,
                S_KL=hkv * nb * bs * d, S_KH=nb * bs * d, S_KB=bs * d, S_KS=d, S_OT=hq * d, S_OH=d)


def paged_prefill_triton(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, layer: jax.Array,
                         query_start: jax.Array, seq_lens: jax.Array, block_tables: jax.Array, *, scale: float,
                         sliding_window: int | jax.Array = 0, k_scale: jax.Array | None = None,
                         v_scale: jax.Array | None = None, prev: jax.Array | None = None, min_q_len: int = 0,
                         block_m: int = 128, block_n: int = 64, num_warps: int = 4, num_stages: int = 2,
                         heavy_first: bool = True) -> jax.Array:
    """Attention of every sequence's new tokens -> [T, Hq, D] (the reference's contract,
    kernels/paged_attention.py). With `prev` and `min_q_len`, sequences with fewer new tokens
    are skipped and their rows of `prev` kept (written in place)."""
    import jax_triton as jt  # imported where the kernel runs: it needs a GPU to lower

    nl, hkv = k_pool.shape[:2]
    meta = kernel_meta(q.shape, k_pool.shape, block_tables.shape[0], block_tables.shape[1], scale=scale,
                       scaled=k_scale is not None, min_q_len=min_q_len, block_m=block_m, block_n=block_n,
                       heavy_first=heavy_first)
    grid = meta.pop("grid")
    i32 = jnp.int32
    scales = jnp.ones((2,), jnp.float32) if k_scale is None else jnp.concatenate(
        [k_scale.astype(jnp.float32).reshape(-1), v_scale.astype(jnp.float32).reshape(-1)])
    layer_arr = jnp.reshape(jnp.asarray(layer, i32), (1,))
    args = (query_start.astype(i32), seq_lens.astype(i32), block_tables.astype(i32), layer_arr,
            jnp.reshape(jnp.asarray(sliding_window, i32), (1,)), scales, q, k_pool, v_pool,
            layer_arr if prev is None else prev)
    return jt.triton_call(*args, kernel=prefill_kernel, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=grid,
                          num_warps=num_warps, num_stages=num_stages, name="paged_attention_qblock_triton",
                          input_output_aliases=None if prev is None else {9: 0}, **meta)
