"""Causal prefill attention over the paged KV pool as a Pallas Mosaic GPU kernel (Hopper: TMA
copies of whole pages, wgmma, a memory warpgroup beside one or two compute warpgroups). Opt-in
through `attention_backend="mosaic"` (kernels/paged_attention_mosaic.py). The reference is
`paged_attention_ref` (kernels/paged_attention.py).

    q:            [T, Hq, D]             bf16 (D = 64 or 128)
    k_pool/v_pool: [L, Hkv, NB, bs, D]   bf16; `block_kv / bs` pages make one KV tile
    query_start:  [S+1]; seq_lens: [S]; block_tables: [S, max_blocks]
    ->            [T, Hq, D]

The tokens are cut per sequence into q blocks of `compute_wgs * BLOCK_Q` rows (`_q_blocks`);
grid (Hq, q blocks). Each compute warpgroup owns `BLOCK_Q` rows of its program's block and walks
the keys they may see (causal; in the sliding window if one is set), `block_kv` at a time,
with an online softmax (tiles wholly visible run unmasked); the memory warpgroup copies each tile's pages (their ids read
from the block table) `stages` tiles ahead, one barrier per tile for its `block_kv / bs` page
copies, and reuses a slot once every compute warpgroup has freed it (one that sees fewer tiles
takes and frees the rest). Two compute warpgroups take turns on the tensor cores, one's softmax
beside the other's matmuls (FlashAttention-3's ping-pong, as JAX's `attention_mgpu`). Each
warpgroup reads and writes whole `BLOCK_Q`-row tiles: q is gathered into a block-padded
layout (each q block at a multiple of its rows) and the output gathered back from it. q, the
output and the pools are addressed as 2-D arrays (rows x D) at rows proven multiples of the
tile (`pl.multiple_of`), as jax 0.11.2's layout inference asks of a TMA copy.
In interpret mode (CPU tests) the two matmuls run as jnp dots: the interpreter's wgmma takes no
transposed or register operands.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxpaged.kernels.mosaic_interpret import interpret_params, layout_cast
from jaxpaged.kernels.paged_attention import token_sequence_ids

BLOCK_Q = 64  # one warpgroup's wgmma rows
MASK = -1e30  # finite: a row with no visible key gives zeros, not NaN


@dataclasses.dataclass(frozen=True)
class QBlocks:
    """Per q block (a static upper bound of them, the unused ones with no rows): its sequence,
    number of rows, and the context position of its first row; the order the grid takes them
    in (the furthest last row first: the most KV tiles, so the last wave is short); per token,
    its row in the block-padded layout of q and the output; per padded row, the token it holds
    (a padding row holds a neighbouring token: finite, masked, and never gathered back)."""
    seq: jax.Array  # int32 [NQB]
    rows: jax.Array
    pos0: jax.Array
    order: jax.Array  # int32 [NQB]: block ids
    out_row: jax.Array  # int32 [T]
    in_row: jax.Array  # int32 [NQB * block_rows]


def _q_blocks(query_start: jax.Array, seq_lens: jax.Array, num_tokens: int, block_rows: int,
              min_q_len: int) -> QBlocks:
    s = seq_lens.shape[0]
    # sum of ceil(q_len / rows) over the taken sequences <= T // rows + their count (<= S and
    # <= T // min_q_len): the padded q / output and the grid do not grow with the decode rows
    nqb = num_tokens // block_rows + min(s, num_tokens // max(min_q_len, 1))
    q_len = query_start[1:] - query_start[:-1]
    per_seq = jnp.where(q_len >= min_q_len, (q_len + block_rows - 1) // block_rows, 0)
    first = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(per_seq).astype(jnp.int32)])  # [S+1]
    b = jnp.arange(nqb, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(first[1:], b, side="right"), s - 1).astype(jnp.int32)
    offset = (b - first[seq]) * block_rows
    rows = jnp.where(b < first[-1], jnp.clip(q_len[seq] - offset, 0, block_rows), 0)
    tseq, _ = token_sequence_ids(query_start, num_tokens)
    within = jnp.arange(num_tokens, dtype=jnp.int32) - query_start[tseq]
    out_row = (first[tseq] + within // block_rows) * block_rows + within % block_rows
    in_row = jnp.clip((query_start[seq] + offset)[:, None] + jnp.arange(block_rows, dtype=jnp.int32), 0, num_tokens - 1)
    pos0 = seq_lens[seq] - q_len[seq] + offset
    order = jnp.argsort(-jnp.where(rows > 0, pos0 + rows, -1), stable=True).astype(jnp.int32)
    return QBlocks(seq, rows.astype(jnp.int32), pos0, order, out_row.astype(jnp.int32),
                   in_row.reshape(-1).astype(jnp.int32))


def paged_prefill_mgpu(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, layer: jax.Array,
                       query_start: jax.Array, seq_lens: jax.Array, block_tables: jax.Array, *, scale: float,
                       sliding_window: int | jax.Array = 0, block_kv: int = 128, stages: int = 2,
                       compute_wgs: int = 2, min_q_len: int = 1, interpret: bool | None = None) -> jax.Array:
    """Causal attention of the step's new tokens over their paged context (module docstring),
    `block_kv` keys (whole pages) per tile, `stages` tiles in flight, `compute_wgs` compute
    warpgroups of `BLOCK_Q` rows each; `sliding_window` > 0: a query at position p sees keys
    at positions > p - window (the tiles before the window are neither copied nor read).
    Sequences of fewer than `min_q_len` new tokens are skipped (their rows hold no result).
    -> [T, Hq, D] in q's dtype."""
    t, hq, d = q.shape
    _, hkv, num_blocks, bs, _ = k_pool.shape
    pages = block_kv // bs
    if block_kv % bs or block_kv % 64 or d % 64 or compute_wgs not in (1, 2):
        raise ValueError(f"paged prefill kernel: block_kv={block_kv} over pages of {bs}, head dim {d}, "
                         f"{compute_wgs} compute warpgroups")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    block_rows = compute_wgs * BLOCK_Q
    qb = _q_blocks(query_start, seq_lens, t, block_rows, min_q_len)
    nqb = qb.seq.shape[0]
    q_blocks = q.reshape(t, hq * d)[qb.in_row]  # a gather: XLA's scatter of these rows took 4x as long
    meta = jnp.stack([qb.order, qb.seq, qb.rows, qb.pos0])  # [4, NQB]
    wide = -(-block_tables.shape[1] // pages) * pages  # whole tiles of page ids (the last tile's tail unread)
    block_tables = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, wide - block_tables.shape[1])))
    group = hq // hkv
    scale_log2 = scale * math.log2(math.e)
    tile = (BLOCK_Q, block_kv)

    def kernel(meta_ref, bt_ref, scalars_ref, q_ref, k_ref, v_ref, o_ref, q_smem2, k_smem, v_smem, bars):
        q_bars, k_bars, v_bars, k_free, v_free, turn = bars
        h, wg = lax.axis_index("heads"), lax.axis_index("wg")
        b = meta_ref[0, lax.axis_index("qb")]  # the grid's heaviest blocks first
        seq, rows, pos0 = (meta_ref[i, b] for i in range(1, 4))
        layer_i, window = scalars_ref[0], scalars_ref[1]

        def first_tile(pos):  # the first tile a query at `pos` sees
            return jnp.where(window > 0, jnp.maximum(pos - window + 1, 0) // block_kv, 0)

        # TMA rows and columns at proven multiples (the tiled shared-memory layout asks for them)
        tile_rows = pl.ds(pl.multiple_of(b * block_rows + wg * BLOCK_Q, BLOCK_Q), BLOCK_Q)
        cols = pl.ds(pl.multiple_of(h * d, d), d)
        steps = jnp.where(rows > 0, (pos0 + rows + block_kv - 1) // block_kv, 0)  # tiles [start, steps): the rows see
        start = jnp.where(rows > 0, first_tile(pos0), 0)

        def sync():  # the compute warpgroups take turns on the tensor cores (FA3's ping-pong)
            if compute_wgs == 2:
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(turn)

        @pl.when(wg < compute_wgs)
        def _compute():
            if compute_wgs == 2:
                plgpu.set_max_registers(232, action="increase")
            q_smem = q_smem2.at[wg]
            my_rows = jnp.clip(rows - wg * BLOCK_Q, 0, BLOCK_Q)
            my_pos0 = pos0 + wg * BLOCK_Q
            my_last = my_pos0 + my_rows - 1
            # its tiles [lo, hi): masked up to `whole_lo` (the window's edge), whole to `whole_hi`
            # (every real row sees every key), masked after (the causal edge); empty: none at `start`
            lo = jnp.where(my_rows > 0, first_tile(my_pos0), start)
            hi = jnp.where(my_rows > 0, my_last // block_kv + 1, start)
            whole_lo = jnp.clip(jnp.where(window > 0, -(-(my_last - window + 1) // block_kv), 0), lo, hi)
            whole_hi = jnp.clip((my_pos0 + 1) // block_kv, whole_lo, hi)
            plgpu.copy_gmem_to_smem(q_ref.at[tile_rows, cols], q_smem, q_bars.at[wg])
            plgpu.barrier_wait(q_bars.at[wg])
            row_layout = plgpu.Layout.WGMMA.reduce(1)
            m = layout_cast(jnp.full((BLOCK_Q,), MASK, jnp.float32), row_layout, interpret)
            l_sum = layout_cast(jnp.zeros((BLOCK_Q,), jnp.float32), row_layout, interpret)
            acc = layout_cast(jnp.zeros((BLOCK_Q, d), jnp.float32), plgpu.Layout.WGMMA, interpret)
            pl.when(wg == 1)(sync)

            def wait_next_k(kv):  # tile kv + 1's keys, waited for while tile kv's PV matmul runs
                pl.when(kv + 1 < steps)(lambda: plgpu.barrier_wait(k_bars.at[lax.rem(kv + 1, stages)]))

            def step(kv, carry, masked: bool):
                acc, m, l_sum = carry
                slot = lax.rem(kv, stages)
                if interpret:
                    s = lax.dot_general(q_smem[...], k_smem[slot], (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)
                    sync()
                else:
                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                        sync()
                        return acc_ref[...]
                    s = pl.run_scoped(qk, plgpu.ACC(tile, jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    row, col = (layout_cast(lax.broadcasted_iota(jnp.int32, tile, dim), plgpu.Layout.WGMMA, interpret)
                                for dim in (0, 1))
                    key, pos = kv * block_kv + col, my_pos0 + row
                    visible = (key <= pos) & (row < my_rows) & ((window <= 0) | (key > pos - window))
                    s = jnp.where(visible, s, MASK)
                # m in log2 units: s * scale_log2 - m is one FMA per score
                m_new = jnp.maximum(m, s.max(axis=1) * scale_log2)
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s * scale_log2 - lax.broadcast_in_dim(m_new, tile, [0]))
                if masked:  # a row with no visible key yet has m_new = MASK * scale_log2: exp2(0) there, not 0
                    p = jnp.where(visible, p, 0.0)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_sum = l_sum * alpha + p.sum(axis=1)
                p16 = p.astype(v_smem.dtype)
                # the softmax done before the other warpgroup's turn (as JAX's attention_mgpu)
                acc, l_sum, m_new, p16 = lax.optimization_barrier((acc, l_sum, m_new, p16))
                if compute_wgs == 2:
                    plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_bars.at[slot])
                if compute_wgs == 2:
                    plgpu.barrier_wait(turn)
                if interpret:
                    acc = acc + lax.dot_general(p16, v_smem[slot], (((1,), (0,)), ((), ())),
                                                preferred_element_type=jnp.float32)
                    wait_next_k(kv)
                else:
                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                        wait_next_k(kv)
                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l_sum

            def skip(kv):  # a tile only the other warpgroup's rows see: taken and freed, turns kept
                slot = lax.rem(kv, stages)
                plgpu.barrier_arrive(k_free.at[slot])
                sync()
                plgpu.barrier_wait(v_bars.at[slot])
                wait_next_k(kv)
                plgpu.barrier_arrive(v_free.at[slot])
                sync()

            pl.when(start < steps)(lambda: plgpu.barrier_wait(k_bars.at[lax.rem(start, stages)]))
            pl.loop(start, lo)(skip)
            carry = lax.fori_loop(lo, whole_lo, lambda kv, c: step(kv, c, True), (acc, m, l_sum))
            carry = lax.fori_loop(whole_lo, whole_hi, lambda kv, c: step(kv, c, False), carry)
            acc, m, l_sum = lax.fori_loop(whole_hi, hi, lambda kv, c: step(kv, c, True), carry)
            pl.loop(hi, steps)(skip)

            pl.when(wg == 0)(sync)
            out = acc / lax.broadcast_in_dim(jnp.maximum(l_sum, 1e-30), acc.shape, [0])
            q_smem[...] = out.astype(q_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, o_ref.at[tile_rows, cols])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == compute_wgs)
        def _memory():
            if compute_wgs == 2:
                plgpu.set_max_registers(40, action="decrease")
            first_page = (layer_i * hkv + h // group) * num_blocks  # this layer's and KV head's page 0 in the pool

            def issue(kv):
                slot = lax.rem(kv, stages)
                # the tile's page ids all loaded before its first copy: their latencies overlap
                ids = [bt_ref[seq, kv * pages + j] for j in range(pages)]
                for j, page in enumerate(ids):  # each page one TMA copy; the tile's barrier expects `pages` arrivals
                    src = pl.ds(pl.multiple_of((first_page + page) * bs, bs), bs)
                    dst = pl.ds(j * bs, bs)
                    plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot, dst], k_bars.at[slot])
                    plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot, dst], v_bars.at[slot])

            def wait_free(kv):  # every compute warpgroup is done with tile kv's slot
                plgpu.barrier_wait(k_free.at[lax.rem(kv, stages)])
                plgpu.barrier_wait(v_free.at[lax.rem(kv, stages)])

            pl.loop(start, jnp.minimum(steps, start + stages))(issue)

            @pl.loop(start + stages, jnp.maximum(steps, start + stages))
            def _rest(kv):
                wait_free(kv - stages)
                issue(kv)

            pl.loop(jnp.maximum(steps - stages, start), steps)(wait_free)  # every phase observed before exit

    def entry(meta_ref, bt_ref, scalars_ref, q_ref, k_ref, v_ref, o_ref):
        tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = lambda *shape: plgpu.SMEM(shape, q.dtype, transforms=tiles)  # noqa: E731
        pl.run_scoped(
            lambda *a: kernel(meta_ref, bt_ref, scalars_ref, q_ref, k_ref, v_ref, o_ref, *a[:3], a[3:]),
            smem(compute_wgs, BLOCK_Q, d), smem(stages, block_kv, d), smem(stages, block_kv, d),
            plgpu.Barrier(num_barriers=compute_wgs),
            plgpu.Barrier(num_arrivals=pages, num_barriers=stages),
            plgpu.Barrier(num_arrivals=pages, num_barriers=stages),
            plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=stages),
            plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=stages),
            plgpu.Barrier(num_arrivals=compute_wgs),
            collective_axes="wg")

    out = plgpu.kernel(entry, out_type=jax.ShapeDtypeStruct((nqb * block_rows, hq * d), q.dtype), grid=(hq, nqb),
                       grid_names=("heads", "qb"), num_threads=compute_wgs + 1, thread_name="wg",
                       compiler_params=plgpu.CompilerParams(approx_math=True),
                       interpret=interpret_params() if interpret else None)(
        meta, block_tables, jnp.stack([jnp.asarray(layer), jnp.asarray(sliding_window)]).astype(jnp.int32), q_blocks,
        k_pool.reshape(-1, d), v_pool.reshape(-1, d))
    return out.reshape(-1, hq, d)[qb.out_row]

