"""Split-KV's second pass (flash-decoding): each row's partial attention results merged, as a
Pallas kernel (Triton lowering) beside the per-sequence kernel of `paged_attention_gpu.py`
that writes them. It reads only the parts each row has, where an XLA merge would read every
slot of the [num_splits, T, H, D] partials (8.4 MB for a 16-row bucket of Llama-3-8B heads).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxpaged.kernels.attention_tiles import next_pow2


def _merge_kernel(qs_ref, step_ref, o_ref, m_ref, l_ref, out_ref, *, num_seqs, num_splits, chunk):
    """Grid (T, H): the parts of token t, head h, merged. A live sequence's token has `parts`
    parts (`step_ref[3]`), a padding token one; they are read `chunk` at a time (masked loads:
    the parts a row does not have are never read)."""
    t, h = pl.program_id(0), pl.program_id(1)
    parts = jnp.minimum(jnp.where(t < qs_ref[num_seqs], step_ref[3], 1), num_splits)
    d = o_ref.shape[-1]
    sp = lax.broadcasted_iota(jnp.int32, (chunk,), 0)
    dcols = lax.broadcasted_iota(jnp.int32, (d,), 0)
    tv, hv = jnp.full((chunk,), t, jnp.int32), jnp.full((chunk,), h, jnp.int32)
    full = lambda x: jnp.broadcast_to(x, (chunk, d))  # noqa: E731

    def body(c, carry):
        m_run, l_run, acc = carry
        p = c * chunk + sp
        has = p < parts
        m = pltriton.load(m_ref.at[(p, tv, hv)], mask=has, other=-jnp.inf)
        l = pltriton.load(l_ref.at[(p, tv, hv)], mask=has, other=0.0)
        o = pltriton.load(o_ref.at[(full(p[:, None]), full(tv[:, None]), full(hv[:, None]), full(dcols[None, :]))],
                          mask=full(has[:, None]), other=0.0)  # [chunk, D]
        m_new = jnp.maximum(m_run, jnp.max(m))  # finite: every chunk read has a part (m >= -1e30)
        w = jnp.where(has, jnp.exp2(m - m_new), 0.0)
        alpha = jnp.exp2(m_run - m_new)
        return m_new, l_run * alpha + jnp.sum(w * l), acc * alpha + jnp.sum(w[:, None] * o, axis=0)

    init = (jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.zeros((d,), jnp.float32))
    _, l_all, acc = lax.fori_loop(0, (parts + chunk - 1) // chunk, body, init)
    out = acc / jnp.where(l_all == 0.0, 1.0, l_all)
    pltriton.store(out_ref.at[(jnp.full((d,), t, jnp.int32), jnp.full((d,), h, jnp.int32), dcols)],
                   out.astype(out_ref.dtype))


def merge_parts(o: jax.Array, m: jax.Array, l: jax.Array, query_start: jax.Array, step: jax.Array, *,
                num_seqs: int, dtype, interpret: bool) -> jax.Array:
    """o: [P, T, H, D] f32 (unnormalized), m, l: [P, T, H] f32 (each part's running max, log2
    domain, and sum); query_start: [S + 1] int32; step: the kernel's step scalars (index 3: the parts
    of each live sequence) -> [T, H, D] in `dtype`."""
    num_splits, t, h, d = o.shape
    kern = functools.partial(_merge_kernel, num_seqs=num_seqs, num_splits=num_splits,
                             chunk=min(next_pow2(num_splits), 32))
    return pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((t, h, d), dtype), grid=(t, h),
                          compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2), interpret=interpret,
                          name="paged_attention_merge")(query_start, step, o, m, l)
