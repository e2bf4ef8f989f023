"""The Mosaic GPU fp8 x fp8 weight-streaming kernel (kernels/fp8_matmul_gpu.py) against numpy:
e4m3 weights times e4m3 tokens, summed in float32 (exact: e4m3 products are exact in float32).
In GPU interpret mode on the CPU; on a GPU, the compiled kernel (wgmma on e4m3 operands) at
Llama-3-8B's sizes, and fp8 W8A8's `linear()` routed through it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxpaged.kernels.fp8_matmul_gpu import fp8_kernel_applies, fp8_matmul_gpu, fp8_matmul_tokens

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
    take are refused, and off a Hopper GPU it does not apply."""
    w, xq, want = _operands(128, 256, 3)
    got = np.asarray(fp8_matmul_tokens(xq, w, interpret=True))
    assert got.shape == (3, 128)
    np.testing.assert_allclose(got, want.T, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match="unsupported shape"):
        fp8_matmul_gpu(w[:, :200], xq[:, :200], interpret=True)
    assert not fp8_kernel_applies(4096, 4096, 65) and not fp8_kernel_applies(100, 4096, 1)
    assert fp8_kernel_applies(4096, 4096, 1) == (ON_GPU and jax.devices()[0].compute_capability == "9.0"
                                                 and jax.device_count() == 1)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("n,k,tokens", [(6144, 4096, 16), (4096, 14336, 32), (28672, 4096, 64)])
def test_fp8_kernel_on_the_gpu(n, k, tokens):
    w, xq, want = _operands(n, k, tokens)
    got = np.asarray(jax.jit(fp8_matmul_gpu)(w, xq))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU or jax.devices()[0].compute_capability != "9.0", reason="needs a Hopper GPU")
def test_fp8_linear_runs_decode_steps_on_the_kernel():
    """fp8 W8A8's `linear()` at 8 tokens: one Mosaic GPU kernel in the compiled program, the
    result XLA's e4m3 dot (cuBLASLt's fp8 GEMM) gives; at 128 tokens, XLA's dot."""
    from jaxpaged.models.layers import linear
    from jaxpaged.models.quantization.kernels import quantize_activations_fp8
    from jaxpaged.models.quantization.quantize import quantize

    rng = np.random.default_rng(1)
    leaf = quantize(jnp.asarray(rng.standard_normal((4096, 6144)) / 64, jnp.bfloat16), "fp8")
    for t in (8, 128):
        x = jnp.asarray(rng.standard_normal((t, 4096)), jnp.bfloat16)
        assert ("mosaic_gpu" in jax.jit(linear).lower(x, leaf).compile().as_text()) == (t <= 64)
        xq, s = quantize_activations_fp8(x, None)
        want = jax.lax.dot_general(xq, leaf.qweight, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        want = np.asarray(want * s * leaf.scale, np.float32)
        got = np.asarray(jax.jit(linear)(x, leaf), np.float32)
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
