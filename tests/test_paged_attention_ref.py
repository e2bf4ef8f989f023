"""The jnp paged attentions (the reference, and the CPU path that loops over the context) and
the KV write against a dense numpy oracle."""
from __future__ import annotations

import importlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.kernels.paged_attention import paged_attention_ref, write_kv
from jaxpaged.kernels.paged_attention_cpu import paged_attention_cpu
from jaxpaged.models.step_input import make_step_input

ATTENTIONS = {"ref": (paged_attention_ref, None), "cpu": (paged_attention_cpu, None),
              # 8 positions per loop iteration: contexts of several chunks, windows across them
              "cpu-chunk8": (paged_attention_cpu, 8)}


def dense_attention(q, k, v, q_pos, scale, window):
    """q: [n, Hq, D] at positions q_pos; k, v: [L, Hkv, D] (the whole context)."""
    hq, hkv = q.shape[1], k.shape[1]
    k = np.repeat(k, hq // hkv, axis=1)
    v = np.repeat(v, hq // hkv, axis=1)
    s = np.einsum("nhd,lhd->hnl", q, k) * scale
    kp = np.arange(k.shape[0])[None, :]
    mask = kp <= q_pos[:, None]
    if window:
        mask &= kp > q_pos[:, None] - window
    s = np.where(mask[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hnl,lhd->nhd", p, v)


@pytest.mark.parametrize("attention", list(ATTENTIONS))
@pytest.mark.parametrize("hq,hkv,window", [(4, 4, 0), (8, 2, 0), (8, 1, 5)])
@pytest.mark.parametrize("num_seqs", [5, 20])  # the CPU path's query blocks: 4 tokens (straddled), 1
def test_paged_attention_matches_dense(hq, hkv, window, attention, num_seqs, monkeypatch):
    fn, chunk = ATTENTIONS[attention]
    if chunk:
        monkeypatch.setattr(importlib.import_module("jaxpaged.kernels.paged_attention_cpu"), "CHUNK_TOKENS", chunk)
    rng = np.random.default_rng(0)
    bs, nb, d, layers = 4, 40, 16, 2
    # (context already cached, new tokens) per sequence: decode, chunk, fresh prefill
    plan = [(17, 1), (6, 9), (0, 13)]
    blocks = rng.permutation(np.arange(1, nb))
    tables, start = [], 0
    for done, new in plan:
        n = -(-(done + new) // bs)
        tables.append(blocks[start:start + n].tolist())
        start += n
    ctx = [rng.standard_normal((done + new, 2, hkv, d)).astype(np.float32) for done, new in plan]
    k_pool = np.zeros((layers, hkv, nb, bs, d), np.float32)
    v_pool = np.zeros_like(k_pool)
    layer = 1
    for (done, new), table, c in zip(plan, tables, ctx):  # fill the cached part
        for p in range(done):
            b, o = table[p // bs], p % bs
            k_pool[layer, :, b, o], v_pool[layer, :, b, o] = c[p, 0], c[p, 1]
    inp = make_step_input([([0] * new, done, t) for (done, new), t in zip(plan, tables)], bs,
                          num_tokens=32, num_seqs=num_seqs, max_blocks=8)
    k_new = np.concatenate([c[done:, 0] for (done, _), c in zip(plan, ctx)])
    v_new = np.concatenate([c[done:, 1] for (done, _), c in zip(plan, ctx)])
    pad = 32 - k_new.shape[0]
    k_new = np.pad(k_new, ((0, pad), (0, 0), (0, 0)), constant_values=7.0)  # padding tokens
    v_new = np.pad(v_new, ((0, pad), (0, 0), (0, 0)), constant_values=7.0)
    kp, vp = write_kv(jnp.asarray(k_pool), jnp.asarray(v_pool), layer, k_new, v_new, inp.slot_mapping)
    # the write put every real token at its slot and touched no other block but the scratch one
    for (done, new), table, c in zip(plan, tables, ctx):
        for p in range(done + new):
            np.testing.assert_array_equal(np.asarray(kp)[layer, :, table[p // bs], p % bs], c[p, 0])
    np.testing.assert_array_equal(np.asarray(kp)[0], 0)
    q = rng.standard_normal((32, hq, d)).astype(np.float32)
    out = fn(jnp.asarray(q), kp, vp, layer, inp.query_start, inp.seq_lens, inp.block_tables, scale=0.3,
             sliding_window=window)
    out = np.asarray(out)
    assert np.isfinite(out).all()  # padding tokens included
    i = 0
    for (done, new), c in zip(plan, ctx):
        ref = dense_attention(q[i:i + new], c[:, 0], c[:, 1], np.arange(done, done + new), 0.3, window)
        np.testing.assert_allclose(out[i:i + new], ref, rtol=1e-5, atol=1e-5)
        i += new


def test_forward_donates_kv_pool(tiny_model_dir):
    from jaxpaged.models import load_model, make_forward
    from jaxpaged.models.kv_cache import init_kv_cache

    cfg, params = load_model(tiny_model_dir("llama"))
    kv = init_kv_cache(cfg, 8, 4, jnp.float32)
    inp = make_step_input([([1, 2, 3], 0, [2])], 4)
    _, new_kv = make_forward(cfg, paged_attention_ref)(params, kv, inp)
    assert kv.k.is_deleted() and kv.v.is_deleted()  # updated in place, not copied
    assert float(jnp.abs(new_kv.k[:, :, 2, :3]).sum()) > 0
    assert float(jnp.abs(new_kv.k[:, :, 3:]).sum()) == 0
