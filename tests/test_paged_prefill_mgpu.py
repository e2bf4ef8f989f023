"""The Mosaic GPU paged prefill kernel (kernels/paged_prefill_mgpu.py) against the jnp reference:
ragged sequences with cached context (chunked prefill), GQA, pages in shuffled order; in GPU
interpret mode on the CPU, compiled on a GPU. And the `attention_backend="mosaic"` route
(kernels/paged_attention_mosaic.py)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.engine.config import EngineConfig
from jaxpaged.kernels import get_attention
from jaxpaged.kernels import paged_attention_mosaic as route
from jaxpaged.kernels.paged_attention import paged_attention_ref
from jaxpaged.kernels.paged_prefill_mgpu import _q_blocks, paged_prefill_mgpu

ON_GPU = jax.default_backend() == "gpu"


def _case(q_lens, ctx_lens, hq=2, hkv=1, d=64, bs=16, layers=2, seed=0):
    rng = np.random.default_rng(seed)
    s = len(q_lens)
    mb = max(-(-c // bs) for c in ctx_lens) + 1
    nb = 1 + s * mb
    perm = rng.permutation(np.arange(1, nb))  # block 0 is the scratch block
    block_tables = perm[: s * mb].reshape(s, mb).astype(np.int32)
    t = sum(q_lens)
    q = jnp.asarray(rng.standard_normal((t, hq, d)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((layers, hkv, nb, bs, d)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((layers, hkv, nb, bs, d)), jnp.bfloat16)
    qs = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    return q, k, v, qs, jnp.asarray(ctx_lens, jnp.int32), jnp.asarray(block_tables)


def test_paged_prefill_kernel_against_the_reference():
    """Two compute warpgroups on: a 5-token chunk over 45, a 130-token chunk after 10 cached
    tokens (a 128-row q block whose second warpgroup sees one tile more than the first, and a
    2-row block). (One warpgroup: the GPU test.)"""
    q, k, v, qs, lens, bt = _case([5, 130], [45, 140])
    layer = jnp.int32(1)
    want = paged_attention_ref(q, k, v, layer, qs, lens, bt, scale=0.125)
    got = paged_prefill_mgpu(q, k, v, layer, qs, lens, bt, scale=0.125, block_kv=64, interpret=True)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2, rtol=2e-2)


def test_q_blocks_fit_every_long_sequence_in_the_tight_bound():
    """The block-padded layout has T // rows + min(S, T // min_q_len) blocks: fewer than one
    per sequence when most rows are decodes, yet every token of each sequence of min_q_len or
    more new tokens gets a row, its sequence's and in order (worst cases: as many sequences of
    exactly min_q_len tokens as fit, each padding a block)."""
    rng = np.random.default_rng(0)
    rows, m = 128, 17
    cases = [[17, 1, 17, 1, 17, 17, 1], [1] * 40 + [130, 40], *(rng.integers(1, 60, 30).tolist() for _ in range(2))]
    for q_lens in cases:
        t, s = sum(q_lens), len(q_lens)
        qs = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
        blocks = jax.jit(lambda qs, lens: (lambda b: (b.rows, b.out_row, b.in_row))(_q_blocks(qs, lens, t, rows, m)))
        block_rows, out_row, in_row = map(np.asarray, blocks(qs, jnp.asarray(q_lens, jnp.int32) + 5))
        assert len(block_rows) == t // rows + min(s, t // m)  # [1] * 40 + [130, 40]: 13 blocks, not 43
        long = [i for i, n in enumerate(q_lens) if n >= m]
        assert block_rows.sum() == sum(q_lens[i] for i in long), q_lens  # every long sequence's token placed
        for i in long:  # its tokens' rows hold those tokens
            tokens = np.arange(int(qs[i]), int(qs[i + 1]))
            np.testing.assert_array_equal(in_row[out_row[tokens]], tokens)


def test_paged_prefill_kernel_with_a_sliding_window():
    """Window 48 over 64-key tiles, a 130-token chunk after 170 cached tokens: the first tile is
    never read, the second warpgroup's rows start past a tile the first one reads, the first
    one's end before the last tile."""
    q, k, v, qs, lens, bt = _case([5, 130], [45, 300], hq=1)  # one head: the window is per row
    layer = jnp.int32(0)
    want = paged_attention_ref(q, k, v, layer, qs, lens, bt, scale=0.125, sliding_window=48)
    got = paged_prefill_mgpu(q, k, v, layer, qs, lens, bt, scale=0.125, sliding_window=jnp.int32(48), block_kv=64,
                             interpret=True)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2, rtol=2e-2)


def test_mosaic_backend_runs_prefill_steps_on_the_kernel_and_decode_steps_on_pallas(monkeypatch):
    """`attention_backend="mosaic"`: in a mixed step (a decode row beside a 70-token chunk) the
    decode row comes from the Pallas kernel (here the reference) and the chunk's rows from the
    Mosaic kernel (its default tiles, two warpgroups), matching the reference; a decode-only step
    (`max_query_len=1`) goes to the Pallas kernel alone. fp8 pools are refused."""
    ran = []

    def pallas(*a, interpret=None, mode="auto", decode_config=None, **k):  # the reference on its rows, NaN elsewhere
        ran.append(f"pallas {mode}")
        out = paged_attention_ref(*a, **k)
        return out.at[1:].set(jnp.nan) if mode == "short" else out

    monkeypatch.setattr(route, "paged_prefill_mgpu", lambda *a, **k: ran.append("mosaic") or paged_prefill_mgpu(*a, **k))
    monkeypatch.setattr(route, "paged_attention_gpu", pallas)
    attention = get_attention("mosaic")
    q, k, v, qs, lens, bt = _case([1, 70], [33, 90], hq=1)
    layer = jnp.int32(1)
    got = attention(q, k, v, layer, qs, lens, bt, scale=0.125)
    want = paged_attention_ref(q, k, v, layer, qs, lens, bt, scale=0.125)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2, rtol=2e-2)
    q1, k1, v1, qs1, lens1, bt1 = _case([1, 1], [33, 90], hq=1)
    attention(q1, k1, v1, layer, qs1, lens1, bt1, scale=0.125, max_query_len=1)
    assert ran == ["pallas short", "mosaic", "pallas auto"]
    with pytest.raises(ValueError, match="fp8"):
        attention(q, k, v, layer, qs, lens, bt, scale=0.125, k_scale=jnp.ones((2, 1)), v_scale=jnp.ones((2, 1)))
    assert not route.mosaic_applies(q.astype(jnp.float16), k, None)  # kv_cache_dtype bfloat16, an fp16 model
    with pytest.raises(ValueError, match="KV pools of the queries' dtype"):
        attention(q.astype(jnp.float16), k, v, layer, qs, lens, bt, scale=0.125)
    with pytest.raises(ValueError, match="attention_backend 'mosaic'.*kv_cache_dtype 'fp8'"):
        EngineConfig(model="m", attention_backend="mosaic", kv_cache_dtype="fp8")
    assert EngineConfig(model="m", attention_backend="mosaic", kv_cache_dtype="bfloat16").kv_cache_dtype == "bfloat16"


def test_mosaic_route_lowers_for_the_gpu():
    """The route's CUDA lowering, here without a GPU, at Llama-3-8B's heads (a 256-token step):
    one Pallas (Triton) launch for the decode rows and one Mosaic GPU kernel. (The layout
    inference that failed on the GPU in jax 0.11.2 does not run here: the GPU tests cover it.)"""
    sd = jax.ShapeDtypeStruct
    pool = sd((2, 8, 512, 16, 128), jnp.bfloat16)
    args = (sd((256, 32, 128), jnp.bfloat16), pool, pool, sd((), jnp.int32), sd((65,), jnp.int32),
            sd((64,), jnp.int32), sd((64, 256), jnp.int32))
    f = functools.partial(get_attention("mosaic"), scale=0.088, interpret=False)
    hlo = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert hlo.count("custom_call @__gpu$xla.gpu.triton(") == 1 and hlo.count("custom_call @mosaic_gpu") == 1


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("block_kv,stages,compute_wgs,window", [(64, 2, 1, 0), (128, 2, 2, 0), (64, 3, 2, 0),
                                                                 (128, 2, 2, 700)])
def test_paged_prefill_kernel_on_the_gpu(block_kv, stages, compute_wgs, window):
    q, k, v, qs, lens, bt = _case([700, 64, 300], [900, 64, 2000], hq=32, hkv=8, d=128)
    layer = jnp.int32(1)
    want = paged_attention_ref(q, k, v, layer, qs, lens, bt, scale=0.088, sliding_window=window)
    got = jax.jit(lambda *a: paged_prefill_mgpu(*a, scale=0.088, sliding_window=window, block_kv=block_kv,
                                                 stages=stages, compute_wgs=compute_wgs))(q, k, v, layer, qs, lens, bt)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2, rtol=2e-2)
