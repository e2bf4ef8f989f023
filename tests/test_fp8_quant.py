"""fp8 W8A8's row kernels (kernels/fp8_quant_gpu.py: the norm or silu(gate) * up and the
per-token e4m3 quantization in one launch), in Pallas interpret mode, against a float64 numpy
oracle; their lowering for a CUDA target; and the model run with them against the model without."""
from __future__ import annotations

import functools
from collections import Counter

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from _jaxprs import pallas_calls
from jaxpaged.kernels.fp8_quant_gpu import quantize_rows, silu_mul_quant
from jaxpaged.models.quantization import kernels as qk

E4M3, BF16 = ml_dtypes.float8_e4m3fn, ml_dtypes.bfloat16


def oracle(y: np.ndarray, ub: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """y [T, W] float64, already rounded as the model rounds it -> (its values in e4m3 (float64),
    scale [T, 1]): scale = min(max |y|, ub) / 448 per row, values rounded to nearest e4m3."""
    amax = np.abs(y).max(-1, keepdims=True)
    scale = np.maximum(amax if ub is None else np.minimum(amax, ub), 1e-12) / 448.0
    return np.clip(y / scale, -448, 448).astype(E4M3).astype(np.float64), scale


def check(got: tuple[jax.Array, jax.Array], want_values: np.ndarray, want_scale: np.ndarray):
    q, scale = got
    assert q.dtype == jnp.float8_e4m3fn and scale.shape == want_scale.shape
    np.testing.assert_allclose(np.asarray(scale, np.float64), want_scale, rtol=1e-2)  # one bf16 step of the max
    q = np.asarray(q).astype(np.float64)
    # rounding y in float32 vs float64 may move a value across an e4m3 midpoint: one e4m3 step at most
    step = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(want_values), 2.0 ** -6))) - 3)
    assert np.all(np.abs(q - want_values) <= step), np.abs(q - want_values).max()
    assert np.mean(q == want_values) > 0.97


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 300)) * rng.uniform(0.05, 20.0, (6, 1))  # 300 columns: a masked tail
    x[3] = 0.0  # an all-zero row: zeros, not NaNs
    x[4, 7] = 500.0  # an outlier the cap saturates
    return x.astype(BF16), (rng.standard_normal(300) * 0.5 + 1.0).astype(BF16)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("ub", [None, 30.0])
def test_quantize_rows_against_numpy(rows, norm, ub):
    x, w = rows
    y = x.astype(np.float64)
    if norm:
        y = y / np.sqrt(np.mean(y * y, -1, keepdims=True) + 1e-5) * w.astype(np.float64)
        y = y.astype(BF16).astype(np.float64)  # rms_norm's output, in the model's dtype
    got = quantize_rows(jnp.asarray(x), jnp.asarray(w) if norm else None, 1e-5,
                        None if ub is None else jnp.float32(ub))
    check(got, *oracle(y, ub))
    assert not np.any(np.asarray(got[0]).astype(np.float64)[3]) and float(got[1][3, 0]) > 0


@pytest.mark.parametrize("launch", [None, (2, 64, 4), (1, 8, 4)])
def test_silu_mul_quant_against_numpy(launch):
    """The gate/up GEMM's float32 sums [T, 2, W] times the token and channel scales, rounded to
    bf16 (the unfused GEMM's output), silu(gate) * up rounded to bf16, quantized; with the
    default launch (one chunk per row here), with 2-row programs over 64-column chunks (a
    masked row in the last program, a masked tail in the last chunk, the amax across chunks)
    and with 25 chunks of 8 that fit the rows exactly (no masks). Interpret mode clamps an
    out-of-range index to the last row or column, so a missing mask shows only compiled, on
    a GPU (this test there; the masked lowering is checked below)."""
    rng = np.random.default_rng(1)
    t, width = 5, 200
    sums = (rng.standard_normal((t, 2, width)) * 2000).astype(np.float32)
    sums[2, :, 190] = 20000.0  # a row's largest value in its last chunk
    row = rng.uniform(0.001, 0.01, (t, 1)).astype(np.float32)
    col = rng.uniform(0.0005, 0.002, (2, width)).astype(np.float32)
    gu = (sums.astype(np.float64) * row[:, :, None] * col).astype(BF16).astype(np.float64)
    g, u = gu[:, 0], gu[:, 1]
    h = (g / (1 + np.exp(-g)) * u).astype(BF16).astype(np.float64)
    for ub in (None, 0.5):
        got = silu_mul_quant(jnp.asarray(sums), jnp.asarray(row), jnp.asarray(col), jnp.bfloat16,
                             None if ub is None else jnp.float32(ub), launch=launch)
        check(got, *oracle(h, ub))


@pytest.mark.parametrize("width,norm", [(4096, True), (14336, False), (576, True), (1536, False)])
def test_row_kernels_lower_to_triton_for_the_gpu(width, norm):
    """Llama-3-8B's hidden and intermediate widths, SmolLM2's hidden and intermediate (1,536:
    the silu kernel's masked last chunk): the Triton lowering for a CUDA target, done here
    without a GPU: one Triton call, e4m3 out."""
    sd = jax.ShapeDtypeStruct
    if norm:
        fn, args = functools.partial(quantize_rows, eps=1e-5, interpret=False), (sd((256, width), jnp.bfloat16),
                                                                                 sd((width,), jnp.bfloat16))
    else:
        fn = functools.partial(silu_mul_quant, dtype=jnp.bfloat16, interpret=False)
        args = (sd((256, 2, width), jnp.float32), sd((256, 1), jnp.float32), sd((2, width), jnp.float32))
    hlo = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert hlo.count("custom_call @__gpu$xla.gpu.triton(") == 1
    assert f"tensor<256x{width}xf8E4M3FN>" in hlo


def test_model_with_row_kernels_matches_the_model_without(tiny_model_dir, monkeypatch):
    """The tiny Llama with fp8 weights, one prefill step: its logits with the row kernels (the
    GPU's path, interpret mode here) against the XLA path's; the kernels are in the step. The
    paths differ by XLA's excess precision alone (it fuses the producer into the quantization
    and skips the bf16 rounding the kernels see: ~1% of the e4m3 values one step apart), which
    this random model amplifies to ~3% of the largest logit."""
    from jaxpaged.kernels.paged_attention import paged_attention_ref
    from jaxpaged.models import llama, load_model, make_forward
    from jaxpaged.models.kv_cache import init_kv_cache
    from jaxpaged.models.step_input import make_step_input

    cfg, params = load_model(tiny_model_dir("llama"), dtype="bfloat16", quantization="fp8")
    prompts = [[5, 9, 200, 31, 7, 7, 64, 3], [11, 2, 90, 400]]
    step = make_step_input([(p, 0, [1 + i]) for i, p in enumerate(prompts)], 16, num_tokens=16, all_logits=True)

    def run(row_kernels: bool):
        monkeypatch.setattr(qk, "fp8_row_kernels",
                            lambda w: row_kernels and isinstance(w, qk.Fp8Weight) and w.input_scale is None)
        llama._layer.clear_cache()  # its trace is cached per shape, not per `fp8_row_kernels`
        fwd = make_forward(cfg, paged_attention_ref)
        kv = init_kv_cache(cfg, 4, 16, jnp.bfloat16)
        return np.asarray(fwd(params, kv, step)[0], np.float64), pallas_calls(jax.make_jaxpr(fwd)(params, kv, step).jaxpr)

    want, plain = run(False)
    got, fused = run(True)
    monkeypatch.undo()
    llama._layer.clear_cache()
    assert plain == []
    # per layer: the two norms' and the attention output's quantization, and the gate/up product's
    assert Counter(fused) == {"quantize_rows": 3 * cfg.num_layers, "silu_mul_quant": cfg.num_layers}
    n = sum(map(len, prompts))
    assert np.abs(got[:n] - want[:n]).max() < 0.05 * np.abs(want[:n]).max()
    assert np.mean(got[:n].argmax(-1) == want[:n].argmax(-1)) >= 0.9


def test_swiglu_with_a_dense_down_takes_the_quantized_input_unfused(monkeypatch):
    """A checkpoint that keeps down_proj unquantized (an `ignore` entry): the norm's row kernel
    still quantizes gate/up's input, and gate/up runs unfused on it; the result equals the XLA
    path's (the same quantized numbers)."""
    from jaxpaged.models.layers import rms_norm_for, swiglu
    from jaxpaged.models.quantization import quantize

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.bfloat16)
    norm = jnp.asarray(rng.uniform(0.5, 1.5, 64), jnp.bfloat16)
    w_gate_up = quantize(jnp.asarray(rng.standard_normal((64, 2, 96)) * 0.1, jnp.float32), "fp8")
    w_down = jnp.asarray(rng.standard_normal((96, 64)) * 0.1, jnp.bfloat16)

    def run(row_kernels: bool):
        monkeypatch.setattr(qk, "fp8_row_kernels", lambda w: row_kernels and isinstance(w, qk.Fp8Weight))
        h = rms_norm_for(x, norm, 1e-5, w_gate_up)
        return h, np.asarray(swiglu(h, w_gate_up, w_down), np.float64)

    h_plain, want = run(False)
    h_fused, got = run(True)
    assert isinstance(h_fused, qk.Fp8Activation) and not isinstance(h_plain, qk.Fp8Activation)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
