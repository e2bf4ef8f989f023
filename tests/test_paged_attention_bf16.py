"""The Pallas paged-attention kernel with bf16 q / KV pool, in Pallas interpret mode (so CI on
CPU covers the bf16 path: `p` rounded to bf16 for the PV dot, f32 running max / sum /
accumulator, split-KV merge, bf16 output) against the jnp reference in float32 on the same
bf16 values.

Long contexts walked in 16-key steps (~125 per sequence) make the accumulator's precision
visible: the kernel is within 0.3 % of the reference per (token, head) row (the bf16 rounding
of its output), while a bf16 accumulator is 1.4 % off.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.kernels.paged_attention import paged_attention_ref
from jaxpaged.kernels.paged_attention_gpu import paged_attention_gpu
from test_paged_attention_kernel import make_case

ROW_TOL = 6e-3  # relative L2 error of any (token, head) output row: ~3 bf16 ulps
# XLA may otherwise keep f32 where the kernel rounds to bf16 (on the GPU Triton rounds)
NO_EXCESS_PRECISION = {"xla_allow_excess_precision": False}


# (plan, T, S, kernel kwargs)
CASES = {
    # T > 32: the fused launch, decode rows in the per-sequence kernel, chunks in the q-block one;
    # padding tokens and a padding sequence
    "mixed": ([(1500, 1), (0, 40), (2000, 1), (300, 23)], 80, 5, dict(block_n=16)),
    # T <= 32: the per-sequence kernel alone, split-KV in two parts merged outside
    "decode split": ([(2000, 1), (3, 1), (1200, 1)], 4, 4, dict(block_n=16, num_splits=2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_kernel_matches_f32_reference_interpret(name):
    plan, t, s, kw = CASES[name]
    hq, hkv, d = 8, 2, 64
    q, k, v, qs, lens, bt = make_case(np.random.default_rng(len(name)), plan, hq=hq, hkv=hkv, d=d, bs=16,
                                      num_tokens=t, num_seqs=s, dtype=jnp.bfloat16)
    scale = d ** -0.5
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref = jax.jit(functools.partial(paged_attention_ref, scale=scale))(f32(q), f32(k), f32(v), 1, qs, lens, bt)
    kernel = functools.partial(paged_attention_gpu, scale=scale, interpret=True, **kw)
    out = jax.jit(kernel, compiler_options=NO_EXCESS_PRECISION)(q, k, v, 1, qs, lens, bt)
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape
    out, ref = np.asarray(f32(out)), np.asarray(ref)
    assert np.isfinite(out).all()  # padding tokens included
    n = int(qs[-1])
    rel = np.linalg.norm(out[:n] - ref[:n], axis=-1) / np.linalg.norm(ref[:n], axis=-1)
    worst = np.unravel_index(rel.argmax(), rel.shape)
    assert rel.max() < ROW_TOL, (rel.max(), worst)
