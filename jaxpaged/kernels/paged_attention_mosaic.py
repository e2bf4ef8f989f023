"""`attention_backend="mosaic"` (Hopper; opt-in, not yet the default): prefill rows on the Mosaic
GPU kernel (`paged_prefill_mgpu.py`), decode rows on the Pallas kernel (`paged_attention_gpu.py`).
bf16 or fp16 pools only: the Mosaic kernel reads no fp8 scales."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpaged.kernels.attention_tiles import DECODE_ONLY_MAX_TOKENS, choose_config, short_query_len
from jaxpaged.kernels.paged_attention import token_sequence_ids
from jaxpaged.kernels.paged_attention_gpu import paged_attention_gpu
from jaxpaged.kernels.paged_prefill_mgpu import paged_prefill_mgpu

SHORT_BLOCK_M = 64  # the Pallas side's q rows per sequence (its decode tile's are 16 at group 4)


def mosaic_applies(q: jax.Array, k_pool: jax.Array, k_scale: jax.Array | None) -> bool:
    """The route's pools and shapes: bf16/fp16 queries and pools of their dtype (no fp8 scales),
    a head dim in 64s, pages that tile the kernel's 128-key blocks."""
    return (k_scale is None and q.dtype in (jnp.bfloat16, jnp.float16) and k_pool.dtype == q.dtype
            and q.shape[-1] % 64 == 0 and 128 % k_pool.shape[3] == 0)


def paged_attention_mosaic(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, layer: jax.Array,
                           query_start: jax.Array, seq_lens: jax.Array, block_tables: jax.Array, *, scale: float,
                           sliding_window: int | jax.Array = 0, max_query_len: int | None = None,
                           k_scale: jax.Array | None = None, v_scale: jax.Array | None = None,
                           interpret: bool | None = None) -> jax.Array:
    """`paged_attention_ref`'s contract. Decode-only steps (at most `DECODE_ONLY_MAX_TOKENS` new
    tokens per sequence, or per step) run the Pallas kernel. In any other step the sequences of
    at most `short_query_len` new tokens (decode rows) run the Pallas per-sequence kernel and the
    rest the Mosaic kernel; each token's row is taken from its sequence's kernel."""
    if not mosaic_applies(q, k_pool, k_scale) or v_scale is not None:
        raise ValueError(f"attention_backend 'mosaic' reads bf16 or fp16 KV pools of the queries' dtype only, "
                         f"head dims in 64s and pages of at most 128 tokens (got {k_pool.dtype} pages of "
                         f"{k_pool.shape[3]}, queries {q.dtype} {q.shape}, fp8 scales: {k_scale is not None}): use "
                         "attention_backend 'pallas'")
    t, hq, d = q.shape
    args = (q, k_pool, v_pool, layer, query_start, seq_lens, block_tables)
    kw = dict(scale=scale, sliding_window=sliding_window, interpret=interpret)
    if min(t, max_query_len or t) <= DECODE_ONLY_MAX_TOKENS:
        return paged_attention_gpu(*args, max_query_len=max_query_len, **kw)
    _, hkv, _, bs, _ = k_pool.shape
    dec, _ = choose_config(t, seq_lens.shape[0], hq, hkv, d, block_tables.shape[1] * bs)
    # the Pallas side takes up to SHORT_BLOCK_M / group new tokens per sequence (16 at group 4):
    # the Mosaic side's block-padded layout is bounded by T // that many sequences, not by S
    dec = dataclasses.replace(dec, block_m=max(dec.block_m, SHORT_BLOCK_M))
    short = short_query_len(dec, hq // hkv)  # the Pallas side's bound, from the config it is given
    few = paged_attention_gpu(*args, mode="short", decode_config=dec, **kw)
    many = paged_prefill_mgpu(*args, min_q_len=short + 1, **kw)
    tseq, _ = token_sequence_ids(query_start, t)
    q_len = query_start[1:] - query_start[:-1]
    return jnp.where((q_len[tseq] > short)[:, None, None], many, few)
