"""The Triton per-q-block kernel (kernels/paged_attention_triton.py) against the jnp reference,
run by Triton's interpreter on CPU (torch tensors). On the GPU it runs through jax-triton
(scripts/bench_kernels.py --prefill-impl triton)."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.kernels.paged_attention import paged_attention_ref
from tests.test_paged_attention_kernel import make_case

torch = pytest.importorskip("torch")
pytest.importorskip("triton")


# Triton decides at decoration time whether a @triton.jit function is interpreted, its own
# library's included: the cases run in a child pytest started with TRITON_INTERPRET=1.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
in_interpreter = pytest.mark.skipif(not INTERPRETED, reason="run by test_in_the_interpreter (TRITON_INTERPRET=1)")


def test_in_the_interpreter():
    if INTERPRETED:
        pytest.skip("this is the child")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env={**os.environ, "TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu"},
                       cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]


@pytest.fixture(scope="module")
def interpreted():
    from jaxpaged.kernels import paged_attention_triton

    return paged_attention_triton


def _torch(x) -> "torch.Tensor":
    x = np.asarray(x)
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    if x.dtype.name == "float8_e4m3fn":
        return torch.from_numpy(x.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    return torch.from_numpy(x.copy())


def run_interpreted(mod, q, k, v, layer, qs, lens, bt, *, scale, window=0, k_scale=None, v_scale=None,
                    prev=None, min_q_len=0, **tiles):
    meta = mod.kernel_meta(q.shape, k.shape, bt.shape[0], bt.shape[1], scale=scale, scaled=k_scale is not None,
                           min_q_len=min_q_len, **tiles)
    grid = meta.pop("grid")
    scales = np.ones(2, np.float32) if k_scale is None else np.concatenate(
        [np.asarray(k_scale, np.float32).ravel(), np.asarray(v_scale, np.float32).ravel()])
    out = _torch(prev if prev is not None else np.zeros(q.shape, q.dtype)).clone()
    args = [_torch(np.asarray(x, np.int32)) for x in (qs, lens, bt, [layer], [window])]
    args += [_torch(scales), _torch(q), _torch(k), _torch(v), out, out]
    mod.prefill_kernel[grid](*args, **meta)
    return out.float().numpy()


def check(mod, plan, *, hq, hkv, d, bs, window=0, num_tokens=None, num_seqs=None, dtype=np.float32,
          kv_dtype=None, tol=2e-5, seed=0, **kw):
    rng = np.random.default_rng(seed)
    q, k, v, qs, lens, bt = make_case(rng, plan, hq=hq, hkv=hkv, d=d, bs=bs, num_tokens=num_tokens,
                                      num_seqs=num_seqs, dtype=dtype)
    scales = {}
    if kv_dtype is not None:
        k_scale = jnp.asarray(rng.uniform(0.5, 2.0, (2, hkv)), jnp.float32)
        v_scale = jnp.asarray(rng.uniform(0.5, 2.0, (2, hkv)), jnp.float32)
        k = (k * k_scale[:, :, None, None, None]).astype(kv_dtype)  # stored = value / scale
        v = (v * v_scale[:, :, None, None, None]).astype(kv_dtype)
        scales = dict(k_scale=k_scale, v_scale=v_scale)
    scale = 1.0 / np.sqrt(d)
    ref = jax.jit(functools.partial(paged_attention_ref, scale=scale, **scales))(
        q, k, v, jnp.int32(1), qs, lens, bt, sliding_window=jnp.int32(window))
    out = run_interpreted(mod, q, k, v, 1, qs, lens, bt, scale=scale, window=window, **scales, **kw)
    n = int(qs[-1])
    np.testing.assert_allclose(out[:n], np.asarray(ref, np.float32)[:n], atol=tol, rtol=tol)
    return q, out


# (plan, hq, hkv, d, bs, window, T, S, tiles): fresh prompts, chunks over a computed context,
# GQA 1 / 4 / 7 (padded group), sliding window, padding tokens and sequences.
CASES = {
    "prefill g4 d64 bs16": ([(0, 45), (0, 70)], 8, 2, 64, 16, 0, 128, 3, {}),
    "chunks over a context g1 bs32": ([(100, 30), (40, 17), (0, 50)], 2, 2, 64, 32, 0, 100, 4, {}),
    "window g4 small tiles": ([(40, 23), (0, 61), (77, 9)], 4, 1, 64, 16, 9, 96, 4,
                              dict(block_m=16, block_n=16)),
    "padded group g7": ([(25, 19), (3, 20)], 7, 1, 32, 16, 0, 48, 3, dict(block_m=32, block_n=16)),
}


@pytest.mark.parametrize("name", list(CASES))
@in_interpreter
def test_triton_kernel_matches_reference(interpreted, name):
    plan, hq, hkv, d, bs, window, t, s, tiles = CASES[name]
    check(interpreted, plan, hq=hq, hkv=hkv, d=d, bs=bs, window=window, num_tokens=t, num_seqs=s, **tiles)


@in_interpreter
def test_half_precision_and_fp8_pool(interpreted):
    """float16 stands for bf16 here (the interpreter computes bf16 wrongly; the GPU check of
    scripts/bench_kernels.py covers it); an e4m3 pool with per-head scales."""
    plan = [(33, 40), (0, 25)]
    kw = dict(hq=4, hkv=1, d=64, bs=16, dtype=jnp.float16, block_m=32, block_n=32)
    check(interpreted, plan, tol=2e-2, **kw)
    check(interpreted, plan, kv_dtype=jnp.float8_e4m3fn, tol=3e-2, **kw)


@in_interpreter
def test_skips_short_sequences_and_keeps_their_rows(interpreted):
    """With `min_q_len` 2, the rows of the one-token sequences (0 and 3) keep `prev` (there:
    the per-sequence kernel's output); the others are attended."""
    plan = [(60, 1), (6, 40), (0, 29), (17, 1)]
    rng = np.random.default_rng(3)
    q, k, v, qs, lens, bt = make_case(rng, plan, hq=8, hkv=2, d=64, bs=16, num_tokens=80, num_seqs=5)
    prev = np.full(q.shape, 7.0, np.float32)
    out = run_interpreted(interpreted, q, k, v, 0, qs, lens, bt, scale=0.125, prev=prev, min_q_len=2)
    ref = np.asarray(paged_attention_ref(q, k, v, jnp.int32(0), qs, lens, bt, scale=0.125))
    short = [0, 70]
    np.testing.assert_array_equal(out[short], prev[short])
    np.testing.assert_allclose(out[1:70], ref[1:70], atol=2e-5, rtol=2e-5)
