"""Paged attention over a ragged batch as Pallas kernels (Triton lowering) for the GPU.

Drop-in replacement for `paged_attention.paged_attention_ref` (same signature and
semantics; extra keyword-only tuning arguments). Design (see docs/kernels.md):

* A program's rows are (query token, query head) pairs of ONE sequence and ONE KV head,
  attended over the sequence's paged KV (`paged_attention_program.py`).
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
read in the kernel, so no layer slice is ever copied.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxpaged.kernels.attention_tiles import (DECODE_ONLY_MAX_TOKENS, TileConfig, choose_config, next_pow2,
                                              num_sms, short_query_len, split_parts, work_slots)
from jaxpaged.kernels.paged_attention_program import LOG2E, qblock_body, seq_body
from jaxpaged.kernels.split_kv_merge import merge_parts

# Every Triton lowering warns in JAX >= 0.11 ("The Pallas Triton backend is deprecated").
warnings.filterwarnings("ignore", message=".*[Tt]riton.*deprecated.*")


@functools.lru_cache(maxsize=None)
def _default_backend() -> str:
    return jax.default_backend()


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
        return seq_body(*refs, s=w, h=h, sp=0, layer=layer, win=win, **kw)
    pad = w == slots
    s, sp = jnp.where(pad, num_seqs, w // parts), jnp.where(pad, 0, w % parts)
    pl.when(pad | (s < live))(lambda: seq_body(*refs, s=s, h=h, sp=sp, layer=layer, win=win, parts=parts, **kw))


def _qblock_kernel(qs_ref, lens_ref, bt_ref, step_ref, sc_ref, q_ref, k_ref, v_ref, *rest, has_prev,
                   num_q_blocks, heavy_first, **kw):
    """Grid (q-blocks, Hkv): program (qb, h) does one q-block of one sequence."""
    pid = pl.program_id(0)
    qb = num_q_blocks - 1 - pid if heavy_first else pid
    qblock_body(qs_ref, lens_ref, bt_ref, sc_ref, q_ref, k_ref, v_ref, _split_refs(rest, has_prev), qb=qb,
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
        qblock_body(*refs, qb=qb, h=h, layer=layer, win=win, **qblock_kw)

    def seq():
        seq_body(*refs, s=pid - num_q_blocks, h=h, sp=0, layer=layer, win=win, **seq_kw)

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
    alone), "prefill" (per-q-block kernel alone), "split" (both, two launches), "fused"
    (both in one launch; the per-sequence part without split-KV) or "short" (the per-sequence
    kernel on the sequences of at most `short_query_len(decode config)` new tokens; the other rows are left
    unwritten, for `paged_attention_mosaic` to fill).
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
    assert mode in ("decode", "prefill", "split", "fused", "short"), mode
    if interpret is None:
        interpret = _default_backend() != "gpu"
    padded_out = bool(interpret)
    bq_dec, bq_pre = short_query_len(dec, group), pre.block_m // group_p
    t_out = t + 2 * max(bq_dec, bq_pre) if padded_out else t
    h_out = hkv * group_p if padded_out else hq

    i32 = jnp.int32
    # an fp8 pool's scales, flat: K's [L * Hkv] then V's (ones for other pools)
    kv_scales = jnp.concatenate([jnp.ones(nl * hkv, jnp.float32) if x is None else x.astype(jnp.float32).reshape(-1)
                                 for x in (k_scale, v_scale)])
    programs = dec.programs or 2 * num_sms()
    live = parts = 1
    if mode in ("decode", "split", "short") and dec.num_splits > 1:
        # split-KV's parts of each of the step's live sequences (they come first; padding ones last)
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
    if mode in ("decode", "split", "short"):
        c = dec
        slots = work_slots(s, hkv, programs, c.num_splits)
        kern = functools.partial(_seq_kernel, max_q_len=None if mode == "decode" else bq_dec, has_prev=False,
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
            out = merge_parts(*outs, scalars[0], step, num_seqs=s, dtype=q.dtype, interpret=interpret)
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
