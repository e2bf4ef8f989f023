"""The Mosaic GPU fp8 x fp8 weight-streaming kernel (kernels/fp8_matmul_gpu.py) against numpy:
e4m3 weights times e4m3 tokens, summed in float32 (exact: e4m3 products are exact in float32).
In GPU interpret mode on the CPU; on a GPU, the compiled kernel (wgmma on e4m3 operands) at
Llama-3-8B's sizes."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxpaged.kernels.fp8_matmul_gpu import fp8_matmul_gpu, fp8_matmul_tokens

ON_GPU = jax.default_backend() == "gpu"


def _operands(n, k, t, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 64).astype(ml_dtypes.float8_e4m3fn)
    x = (rng.standard_normal((t, k)) * 8).astype(ml_dtypes.float8_e4m3fn)
    want = w.astype(np.float64) @ x.astype(np.float64).T
    return jnp.asarray(w), jnp.asarray(x), want


@pytest.mark.parametrize("tokens,splits", [(16, 1), (32, 2)])
def test_fp8_kernel_against_numpy(tokens, splits):
    """Two row tiles, four K steps (split in two where asked): every tile and step lands once."""
    w, xq, want = _operands(128, 512, tokens)
    got = np.asarray(fp8_matmul_gpu(w, xq, splits=splits, interpret=True))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_fp8_kernel_on_a_few_tokens_and_its_shapes():
    """xq [T, K] in, [T, N] out (padded to 16 tokens, the padding cut away); shapes it cannot
    take are refused."""
    w, xq, want = _operands(128, 256, 3)
    got = np.asarray(fp8_matmul_tokens(xq, w, interpret=True))
    assert got.shape == (3, 128)
    np.testing.assert_allclose(got, want.T, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match="unsupported shape"):
        fp8_matmul_gpu(w[:, :200], xq[:, :200], interpret=True)
    with pytest.raises(ValueError, match="unsupported shape"):
        fp8_matmul_gpu(w, jnp.zeros((80, 256), xq.dtype), interpret=True)  # over 64 tokens


def test_fp8_kernel_lowers_for_the_gpu():
    """The kernel's CUDA lowering, here without a GPU, at Llama-3-8B's gate/up size and 64
    tokens: one Mosaic GPU call (e4m3 wgmma operands pass the lowering's checks; the layout
    inference of the GPU compile does not run here: the GPU tests cover it)."""
    sd = jax.ShapeDtypeStruct
    f = functools.partial(fp8_matmul_gpu, splits=2, interpret=False)
    lowered = jax.jit(f).trace(sd((28672, 4096), jnp.float8_e4m3fn), sd((64, 4096), jnp.float8_e4m3fn))
    assert lowered.lower(lowering_platforms=("cuda",)).as_text().count("custom_call @mosaic_gpu") == 1


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("n,k,tokens", [(6144, 4096, 16), (4096, 14336, 32), (28672, 4096, 64)])
def test_fp8_kernel_on_the_gpu(n, k, tokens):
    w, xq, want = _operands(n, k, tokens)
    got = np.asarray(jax.jit(fp8_matmul_gpu)(w, xq))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

