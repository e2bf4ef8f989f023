"""The Mosaic GPU 8-bit-weight kernel (kernels/w8a16_matmul_gpu.py) against numpy: fp8 e4m3 and
int8 weights (exact in bf16) times bf16 tokens, summed in float32. In GPU interpret mode on the
CPU; on a GPU, the compiled kernel (its converted tile in registers) at Llama-3-8B's sizes."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxpaged.kernels.w8a16_matmul_gpu import padded_tokens, supported, w8a16_matmul_gpu, w8a16_matmul_tokens

ON_GPU = jax.default_backend() == "gpu"


def _operands(n, k, t, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == "int8":
        w = rng.integers(-128, 128, (n, k)).astype(np.int8)
    else:
        w = (rng.standard_normal((n, k)) * 64).astype(ml_dtypes.float8_e4m3fn)
    x = rng.standard_normal((k, t)).astype(ml_dtypes.bfloat16)
    want = w.astype(np.float64) @ x.astype(np.float64)
    return jnp.asarray(w), jnp.asarray(x), want


@pytest.mark.parametrize("dtype", ["fp8", "int8"])
@pytest.mark.parametrize("tokens,splits", [(16, 1), (32, 2)])
def test_w8a16_kernel_against_numpy(dtype, tokens, splits):
    """Two row tiles, four K steps (split in two where asked): every tile and step lands once."""
    w, xt, want = _operands(128, 512, tokens, dtype)
    got = np.asarray(w8a16_matmul_gpu(w, xt, splits=splits, interpret=True))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _int4_operands(n, k, t, group, scale_acc, seed=0):
    """Signed int4 [N, K], bf16 scales and (shifted) zeros [K / group, N], and the dequantized
    weight times x: exact (`scale_acc`: the kernel scales float32 sums), or the weight rounded
    to bf16 as the kernel's scaled tile is."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-8, 8, (n, k))
    scales = rng.uniform(0.01, 0.1, (k // group, n)).astype(ml_dtypes.bfloat16)
    zeros = rng.integers(-8, 8, (k // group, n)).astype(ml_dtypes.bfloat16)
    per_group = lambda a: np.repeat(a.astype(np.float64).T, group, axis=1)  # noqa: E731
    dense = (q - per_group(zeros)) * per_group(scales)
    dense = dense if scale_acc else dense.astype(ml_dtypes.bfloat16)
    x = rng.standard_normal((k, t)).astype(ml_dtypes.bfloat16)
    want = dense.astype(np.float64) @ x.astype(np.float64)
    return (jnp.asarray(q, jnp.int4), jnp.asarray(x), jnp.asarray(scales), jnp.asarray(zeros)), want


@pytest.mark.parametrize("scale_acc", [True, False])
@pytest.mark.parametrize("group,splits", [(128, 2), (256, 1)])
def test_w4a16_kernel_against_numpy(group, splits, scale_acc):
    """int4 tiles scaled per group of input columns (one group per step, or one per two), on
    the tile or on each step's sums."""
    args, want = _int4_operands(128, 512, 16, group, scale_acc)
    got = np.asarray(w8a16_matmul_gpu(*args, splits=splits, scale_acc=scale_acc, interpret=True))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_w4a16_kernel_steps_over_several_groups():
    """Scaled tiles, 256-column steps over groups of 128: each group's half of a tile scaled by
    its own row of scales and zeros, one MMA each."""
    args, want = _int4_operands(128, 512, 16, 128, False)
    got = np.asarray(w8a16_matmul_gpu(*args, block_k=256, splits=1, scale_acc=False, interpret=True))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match="do not fit 256-column steps"):  # on the sums: one group a step
        w8a16_matmul_gpu(*args, block_k=256, interpret=True)


def test_w8a16_kernel_on_a_few_tokens():
    """x [T, K] in, [T, N] out: x padded to 16 tokens and transposed, the padding cut away."""
    w, xt, want = _operands(128, 256, 3, "int8")
    got = np.asarray(w8a16_matmul_tokens(xt.T, w, interpret=True))
    assert got.shape == (3, 128)
    np.testing.assert_allclose(got, want.T, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_w8a16_kernel_shapes():
    assert [padded_tokens(t) for t in (1, 8, 9, 17, 64)] == [16, 16, 16, 32, 64]
    assert supported(4096, 14336, 64) and not supported(4096, 14336, 65) and not supported(100, 4096, 1)
    with pytest.raises(ValueError, match="unsupported shape"):
        w8a16_matmul_gpu(jnp.zeros((128, 100), jnp.int8), jnp.zeros((100, 16), jnp.bfloat16))
    with pytest.raises(ValueError, match="groups of 64"):
        w8a16_matmul_gpu(jnp.zeros((128, 256), jnp.int4), jnp.zeros((256, 16), jnp.bfloat16),
                         jnp.ones((4, 128), jnp.bfloat16), jnp.zeros((4, 128), jnp.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("dtype", ["fp8", "int8"])
@pytest.mark.parametrize("n,k,tokens", [(6144, 4096, 16), (4096, 14336, 32), (28672, 4096, 64)])
def test_w8a16_kernel_on_the_gpu(dtype, n, k, tokens):
    w, xt, want = _operands(n, k, tokens, dtype)
    got = np.asarray(jax.jit(w8a16_matmul_gpu)(w, xt))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("scale_acc,block_k", [(True, 128), (False, 128), (False, 512)])
@pytest.mark.parametrize("n,k,tokens", [(6144, 4096, 16), (4096, 14336, 32)])
def test_w4a16_kernel_on_the_gpu(n, k, tokens, scale_acc, block_k):
    args, want = _int4_operands(n, k, tokens, 128, scale_acc)
    got = np.asarray(jax.jit(functools.partial(w8a16_matmul_gpu, scale_acc=scale_acc, block_k=block_k))(*args))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
