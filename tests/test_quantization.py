"""Quantized weights in `linear()`: fp8 W8A8, block fp8, int8 W8A16 (per channel, in groups), int8
W8A8 and int4 W4A16 (with act-order groups) against numpy references that dequantize the stored
values exactly (and, for W8A8, quantize the activations exactly as the kernel should); the fp8
and int8 W8A8 GEMMs' operands are 8-bit in the lowered StableHLO; online quantization at load,
its flags and its one-line errors."""
from __future__ import annotations

import functools

import json
import re
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxpaged.models import ConfigError, load_model
from jaxpaged.models.layers import linear
from jaxpaged.models.quantization import (Fp8BlockWeight, Fp8Weight, Int4Weight, Int8W8A8Weight, Int8Weight,
                                         fuse_out, load_quantization_config, quantize)
from jaxpaged.models.quantization.kernels import fp8_matmul, int4_matmul
from jaxpaged.models.quantization.packing import pack_int4, unpack_int4

E4M3 = ml_dtypes.float8_e4m3fn
SHAPE = (64, 2, 4, 16)  # [in, *out] as the fused q/k/v weight [H, Hkv, G + 2, D]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    w = (0.05 * rng.standard_normal(SHAPE) * rng.uniform(0.2, 3.0, SHAPE[1:])).astype(np.float32)
    x = (rng.standard_normal((5, SHAPE[0])) * rng.uniform(0.1, 10.0, (5, 1))).astype(np.float32)
    return x, w


def rel_err(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def ref_fp8_weight(w: Fp8Weight) -> np.ndarray:
    """[in, *out] float64 from the stored e4m3 [*out, in] values and per-channel scales."""
    q = np.asarray(w.qweight).astype(np.float64)
    return np.moveaxis(q * np.asarray(w.scale, np.float64)[..., None], -1, 0)


def ref_int4_weight(w: Int4Weight, g_idx: np.ndarray | None = None) -> np.ndarray:
    """Nibble j of word i is input row 8i + j; group g of rows shares scales[g] and zeros[g]
    (with `g_idx`, act-order: row i is in group g_idx[i])."""
    words = np.asarray(w.qweight).astype(np.int64) & 0xFFFFFFFF
    q = np.stack([(words >> (4 * j)) & 0xF for j in range(8)], axis=1).reshape(-1, *words.shape[1:])
    groups = np.arange(q.shape[0]) // (q.shape[0] // w.scales.shape[0]) if g_idx is None else g_idx
    return (q - np.asarray(w.zeros, np.int64)[groups]) * np.asarray(w.scales, np.float64)[groups]


def test_fp8_linear_against_numpy(data):
    x, w = data
    leaf = quantize(jnp.asarray(w), "fp8")
    assert leaf.qweight.dtype == jnp.float8_e4m3fn and leaf.qweight.shape == (*SHAPE[1:], SHAPE[0])
    wq = ref_fp8_weight(leaf)
    amax = np.abs(w).max(0)
    assert np.all(np.abs(wq - w) <= np.abs(w) / 16 + amax / 448 * 2.0 ** -9)  # e4m3 rounding
    got = np.asarray(linear(jnp.asarray(x), leaf))
    assert got.shape == (5, *SHAPE[1:])
    # W8A8: each token scaled to amax 448 and cast to e4m3; both operands dequantized exactly
    sx = np.abs(x).max(1, keepdims=True) / 448
    xq = (x / sx).astype(E4M3).astype(np.float64) * sx
    assert rel_err(got, np.tensordot(xq, wq, axes=1)) <= 1e-5
    # bf16 activations (the engine's): the GEMM's float32 result scaled, then rounded once
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    sxb = np.abs(xb).max(1, keepdims=True) / 448
    want = np.tensordot((xb / sxb).astype(E4M3).astype(np.float64) * sxb, wq, axes=1)
    assert rel_err(np.asarray(linear(jnp.asarray(x, jnp.bfloat16), leaf), np.float64), want) <= 1e-2
    # the small-step form (the GPU's, up to FP8_REDUCE_MAX_TOKENS): the same products, summed by a reduce
    assert rel_err(fp8_matmul(jnp.asarray(x), leaf, reduce=True), np.tensordot(xq, wq, axes=1)) <= 1e-5
    # against float activations: e4m3's 3 mantissa bits cost a few percent on random data
    assert rel_err(got, np.tensordot(x.astype(np.float64), wq, axes=1)) <= 0.04
    # FBGEMM's activation_scale_ub caps each token's amax: larger values saturate at the cap
    ub = float(np.median(np.abs(x).max(1)))
    capped = Fp8Weight(leaf.qweight, leaf.scale, None, jnp.float32(ub))
    su = np.minimum(np.abs(x).max(1, keepdims=True), ub) / 448
    xu = np.clip(x / su, -448, 448).astype(E4M3).astype(np.float64) * su
    assert rel_err(linear(jnp.asarray(x), capped), np.tensordot(xu, wq, axes=1)) <= 1e-5
    assert rel_err(linear(jnp.asarray(x), capped), np.tensordot(xq, wq, axes=1)) > 1e-3  # the cap binds
    # a static per-tensor activation scale clips what exceeds it
    static = Fp8Weight(leaf.qweight, leaf.scale, jnp.float32(0.02))
    xs = np.clip(x / 0.02, -448, 448).astype(E4M3).astype(np.float64) * 0.02
    assert rel_err(linear(jnp.asarray(x), static), np.tensordot(xs, wq, axes=1)) <= 1e-5


def test_int8_linear_against_numpy(data):
    x, w = data
    leaf = quantize(jnp.asarray(w), "int8")
    q, scale = np.asarray(leaf.qweight), np.asarray(leaf.scale, np.float64)
    assert q.dtype == np.int8 and np.abs(q).max() == 127
    wq = q * scale
    assert np.all(np.abs(wq - w) <= scale / 2 + 1e-9)
    got = linear(jnp.asarray(x), leaf, jnp.ones(SHAPE[1:]))
    assert rel_err(got, np.tensordot(x.astype(np.float64), wq, axes=1) + 1) <= 1e-3


def test_int4_linear_against_numpy(data):
    x, w = data
    w = np.concatenate([w, w + 0.03], axis=0)  # 128 input rows: one group of 128
    leaf = quantize(jnp.asarray(w), "int4")
    assert leaf.qweight.shape == (16, *SHAPE[1:]) and leaf.group_size == 128
    assert np.asarray(leaf.zeros).min() > 0  # asymmetric: the zero points vary
    wq = ref_int4_weight(leaf)
    assert np.all(np.abs(wq - w) <= np.asarray(leaf.scales) / 2 + 1e-6)
    x2 = np.concatenate([x, x[:, ::-1]], axis=1)
    assert rel_err(linear(jnp.asarray(x2), leaf), np.tensordot(x2.astype(np.float64), wq, axes=1)) <= 1e-3
    grouped = quantize(jnp.asarray(w), "int4", group_size=32)
    assert grouped.scales.shape == (4, *SHAPE[1:])
    assert rel_err(linear(jnp.asarray(x2), grouped), np.tensordot(x2.astype(np.float64),
                                                                  ref_int4_weight(grouped), axes=1)) <= 1e-3


@pytest.mark.parametrize("tokens,group,act_order", [(5, 32, False), (37, 128, False), (5, 32, True)])
def test_int4_pallas_kernel_against_numpy(data, tokens, group, act_order):
    """The GPU kernel (interpret mode here) on the fused [in, H, Hkv, D] weight: packed words
    unpacked in registers, one scale / zero row per K step, split-K parts summed; x in bf16 as in
    a model, so the bound is bf16's rounding of x and of the dequantized tile. Act-order: the
    same values with input row i in group g_idx[i], stored sorted by group."""
    _, w = data
    w = np.concatenate([w, w + 0.03], axis=0)
    x = np.random.default_rng(1).standard_normal((tokens, 128)).astype(np.float32)
    leaf = quantize(jnp.asarray(w), "int4", group_size=group)
    g_idx = np.random.default_rng(3).permutation(128) // group if act_order else None
    want = np.tensordot(x.astype(np.float64), ref_int4_weight(leaf, g_idx), axes=1)
    if act_order:
        leaf = Int4Weight.act_order(*(np.asarray(a) for a in (leaf.qweight, leaf.scales, leaf.zeros)), g_idx)
    xb = jnp.asarray(x, jnp.bfloat16)
    got = int4_matmul(xb, leaf, kernel=True)
    assert got.shape == (tokens, *SHAPE[1:]) and got.dtype == jnp.bfloat16
    assert rel_err(got.astype(jnp.float32), want) <= 1e-2
    assert rel_err(got.astype(jnp.float32), int4_matmul(xb, leaf, kernel=False).astype(jnp.float32)) <= 1e-2


@pytest.mark.parametrize("shape,spec,group", [((256, 2, 4, 16), (None, "tp"), 64), ((512, 64), ("tp", None), 128)])
def test_int4_kernel_per_device_on_two_devices(shape, spec, group):
    """With a tensor-parallel `layout` the kernel (interpret mode here) runs on each device's
    part inside shard_map: a column-parallel weight (the fused q/k/v, split over KV heads) gives
    each device its columns; a row-parallel one gives partial sums added across devices."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2,), ("tp",), devices=jax.devices()[:2], axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(2)
    w = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    x = rng.standard_normal((5, shape[0])).astype(np.float32)
    leaf = quantize(jnp.asarray(w), "int4", group_size=group)
    layout = NamedSharding(mesh, P(*spec))
    placed = Int4Weight(*(jax.device_put(getattr(leaf, f), layout) for f in ("qweight", "scales", "zeros")),
                        layout=layout)
    matmul = jax.jit(functools.partial(int4_matmul, kernel=True))
    xb = jnp.asarray(x, jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(matmul)(xb, placed))
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    got = matmul(xb, placed)
    assert got.shape == (5, *shape[1:]) and got.dtype == jnp.bfloat16
    assert rel_err(got.astype(jnp.float32), np.tensordot(x.astype(np.float64), ref_int4_weight(leaf), axes=1)) <= 1e-2


def test_int4_layouts_on_a_mesh(tiny_model_dir):
    """Loaded on a 2-device mesh, an int4 leaf whose fields the mesh splits alike carries its
    dense weight's layout (q/k/v split over KV heads); o's 64 input rows make one group of
    scales, which stays whole, so o has none and XLA partitions its dequantized dot."""
    from jax.sharding import PartitionSpec as P

    from jaxpaged.engine.mesh import make_mesh

    cfg, params = load_model(tiny_model_dir("llama"), "float32", mesh=make_mesh(2), quantization="int4")
    layer = params["layers"][0]
    assert layer["wqkv"].layout.spec == P(None, "tp") and layer["w_gate_up"].layout.spec == P(None, None, "tp")
    assert layer["wo"].scales.shape[0] == 1 and layer["wo"].layout is None


@pytest.mark.parametrize("tokens,splits", [(1, 2), (5, 2), (16, 1), (37, 1)])
def test_int4_kernel_groups_of_128_against_numpy(tokens, splits):
    """Groups of 128 (planes of `q - zero` made from the bits, the step's scale on the sums; 16
    tokens: the decode tile; 1 token: the FMA kernel over planes of 16 + q), interpret mode:
    against the dequantized weight in float64."""
    from jaxpaged.kernels.int4_matmul_gpu import int4_matmul_gpu
    rng = np.random.default_rng(4)
    leaf = quantize(jnp.asarray(rng.standard_normal((512, 192)).astype(np.float32)), "int4", group_size=128)
    x = rng.standard_normal((tokens, 512)).astype(np.float32)
    want = x.astype(np.float64) @ ref_int4_weight(leaf)
    got = int4_matmul_gpu(jnp.asarray(x, jnp.bfloat16), leaf.qweight, leaf.scales, leaf.zeros, splits=splits)
    assert rel_err(got.astype(jnp.float32), want) <= 1e-2


def test_int4_kernel_rejects_prefetch_outside_its_one_token_form():
    """`prefetch` (a launch knob of the one-token form) on a step that takes the MMA form is an
    error naming it, not ignored."""
    from jaxpaged.kernels.int4_matmul_gpu import int4_matmul_gpu
    leaf = quantize(jnp.zeros((512, 192), jnp.float32), "int4", group_size=128)
    with pytest.raises(ValueError, match="prefetch=2 applies to the one-token form only"):
        int4_matmul_gpu(jnp.zeros((16, 512), jnp.bfloat16), leaf.qweight, leaf.scales, leaf.zeros, prefetch=2)


@pytest.mark.parametrize("tokens,g,n", [(1, 128, 6144), (64, 128, 6144), (256, 128, 6144), (16, 32, 6144),
                                        (1, 128, 48)])
def test_int4_pallas_kernel_lowers_to_triton_for_the_gpu(tokens, g, n):
    """The kernel's Triton lowering, done here for a CUDA target (no GPU needed) at Llama-3-8B's
    qkv shape with groups of 128 (biased planes; one token: the FMA form) and 32 (scaled planes),
    and one token over 48 columns (a tensor-parallel part's narrow width: 16-column tiles): an
    op or block shape Triton refuses fails here, not on the first GPU run. The program holds
    one Triton call and no dequantized [K, N] weight."""
    from jaxpaged.kernels.int4_matmul_gpu import int4_matmul_gpu
    k = 4096
    sd = jax.ShapeDtypeStruct
    args = (sd((tokens, k), jnp.bfloat16), sd((k // 8, n), jnp.int32), sd((k // g, n), jnp.bfloat16),
            sd((k // g, n), jnp.uint8))
    hlo = jax.jit(functools.partial(int4_matmul_gpu, interpret=False)).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert hlo.count("custom_call @__gpu$xla.gpu.triton(") == 1
    assert f"{k}x{n}x" not in hlo


def test_fp8_block_linear_against_numpy(data):
    """Blocks of 48 x 48 over the flattened [128 out, 64 in] weight: partial blocks on both axes;
    the GEMM is weight-only (x unquantized), so float32 rounding apart it is x @ w."""
    x, w = data
    leaf = quantize(jnp.asarray(w), "fp8_block", group_size=48)
    assert isinstance(leaf, Fp8BlockWeight) and leaf.shape == SHAPE and leaf.scale.shape == (*SHAPE[1:], 2)
    flat = w.reshape(64, 128).T  # [out, in]
    block_scale = np.array([[np.abs(flat[i:i + 48, j:j + 48]).max() / 448 for j in (0, 48)] for i in (0, 48, 96)])
    scale = np.asarray(leaf.scale).reshape(128, 2)
    np.testing.assert_allclose(scale, np.repeat(block_scale, 48, axis=0)[:128], rtol=1e-6)
    q = np.asarray(leaf.qweight).reshape(128, 64).astype(np.float64)
    wq = (q * np.repeat(scale, 48, axis=1)[:, :64]).T.reshape(SHAPE)
    assert rel_err(wq, w) <= 0.04  # e4m3 rounding
    np.testing.assert_allclose(leaf.dequantize(), wq, rtol=1e-6)
    assert rel_err(linear(jnp.asarray(x), leaf), np.tensordot(x.astype(np.float64), wq, axes=1)) <= 1e-5


def test_int8_w8a8_linear_against_numpy(data):
    """Tokens rounded to int8 at (row amax / 127), int32 products, times both scales."""
    x, w = data
    leaf = quantize(jnp.asarray(w), "int8_w8a8")
    assert type(leaf) is Int8W8A8Weight
    # a tree structure of its own: one equal to W8A16's lets a jit cache run the W8A16 program
    assert jax.tree.structure(leaf) != jax.tree.structure(quantize(jnp.asarray(w), "int8"))
    wq = np.asarray(leaf.qweight) * np.asarray(leaf.scale, np.float64)
    sx = np.abs(x).max(1, keepdims=True) / 127
    xq = np.round(x / sx) * sx
    got = linear(jnp.asarray(x), leaf)
    assert rel_err(got, np.tensordot(xq, wq, axes=1)) <= 1e-5
    assert rel_err(got, np.tensordot(x.astype(np.float64), wq, axes=1)) <= 0.01


def test_int8_groups_and_int4_act_order_against_numpy(data):
    x, w = data
    grouped = quantize(jnp.asarray(w), "int8", group_size=16)
    assert grouped.scale.shape == (4, *SHAPE[1:])
    wq = np.asarray(grouped.qweight) * np.repeat(np.asarray(grouped.scale, np.float64), 16, axis=0)
    assert np.all(np.abs(wq - w) <= np.repeat(np.asarray(grouped.scale), 16, axis=0) / 2 + 1e-9)
    assert rel_err(linear(jnp.asarray(x), grouped), np.tensordot(x.astype(np.float64), wq, axes=1)) <= 1e-5
    # act-order: input row i takes group g_idx[i]'s scale and zero point
    leaf = quantize(jnp.asarray(w), "int4", group_size=16)
    g_idx = np.random.default_rng(2).permutation(64) // 16
    reordered = Int4Weight.act_order(np.asarray(leaf.qweight), np.asarray(leaf.scales), np.asarray(leaf.zeros), g_idx)
    assert reordered.perm is not None and np.array_equal(np.sort(g_idx[np.asarray(reordered.perm)]), g_idx[np.asarray(reordered.perm)])
    words = np.asarray(leaf.qweight).astype(np.int64) & 0xFFFFFFFF
    q = np.stack([(words >> (4 * j)) & 0xF for j in range(8)], axis=1).reshape(64, *SHAPE[1:])
    want = (q - np.asarray(leaf.zeros, np.int64)[g_idx]) * np.asarray(leaf.scales, np.float64)[g_idx]
    assert rel_err(linear(jnp.asarray(x), reordered), np.tensordot(x.astype(np.float64), want, axes=1)) <= 1e-5
    np.testing.assert_allclose(reordered.dequantize(), want, rtol=1e-6)  # in the checkpoint's row order
    with pytest.raises(ConfigError, match="groups of unequal sizes"):
        Int4Weight.act_order(np.asarray(leaf.qweight), np.asarray(leaf.scales), np.asarray(leaf.zeros), np.arange(64) % 3)
    with pytest.raises(ConfigError, match="g_idx differ"):  # q/k/v (gate/up) share one input, so one g_idx
        fuse_out([reordered, leaf], lambda ps: jnp.concatenate(ps, -1))


def test_int4_packing_round_trip():
    v = np.random.default_rng(1).integers(0, 16, (32, 3, 5))
    packed = pack_int4(v)
    assert packed.dtype == jnp.int32 and packed.shape == (4, 3, 5)
    np.testing.assert_array_equal(unpack_int4(packed), v)
    assert int(pack_int4(np.arange(8)[:, None])[0, 0]) == np.int32(np.uint32(0x76543210).view(np.int32))


def _dots(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]


def test_fp8_gemm_takes_e4m3_operands_in_stablehlo(data):
    """No dequantize-then-bf16 GEMM: the one dot of the lowered fp8 linear multiplies e4m3 by
    e4m3 into float32 (the pattern XLA lowers to a cuBLASLt fp8 GEMM on Hopper)."""
    x, w = data
    leaf = quantize(jnp.asarray(w), "fp8")
    hlo = jax.jit(linear).lower(jnp.asarray(x, jnp.bfloat16), leaf).as_text()
    (dot,) = _dots(hlo)
    operands, result = re.search(r"\((tensor<[^)]*)\) -> (tensor<[^>]*>)", dot).groups()
    assert operands == "tensor<5x64xf8E4M3FN>, tensor<2x4x16x64xf8E4M3FN>", dot
    assert result == "tensor<5x2x4x16xf32>", dot
    # a 1-token step's reduce form (the GPU's): no dot, one reduce over the contracted axis
    one = jax.jit(functools.partial(fp8_matmul, reduce=True)).lower(jnp.asarray(x[:1], jnp.bfloat16), leaf).as_text()
    assert not _dots(one) and re.search(r"stablehlo.reduce\(.*across dimensions = \[4\]", one), one
    (int8_dot,) = _dots(jax.jit(linear).lower(jnp.asarray(x, jnp.bfloat16), quantize(jnp.asarray(w), "int8")).as_text())
    assert "tensor<64x2x4x16xbf16>" in int8_dot  # W8A16: the int8 weight converted to the activations' dtype
    (w8a8_dot,) = _dots(jax.jit(linear).lower(jnp.asarray(x, jnp.bfloat16), quantize(jnp.asarray(w), "int8_w8a8")).as_text())
    assert "(tensor<5x64xi8>, tensor<64x2x4x16xi8>) -> tensor<5x2x4x16xi32>" in w8a8_dot, w8a8_dot
    # block fp8 (docs/decisions.md): the dequantized weight in the activations' dtype, float32 accumulation
    (block_dot,) = _dots(jax.jit(linear).lower(jnp.asarray(x, jnp.bfloat16), quantize(jnp.asarray(w), "fp8_block", 32)).as_text())
    assert "(tensor<5x64xbf16>, tensor<2x4x16x64xbf16>) -> tensor<5x2x4x16xf32>" in block_dot, block_dot


def test_leaf_specs_follow_the_dense_spec():
    from jax.sharding import PartitionSpec as P

    w = jnp.zeros((64, 2, 4, 16))
    assert quantize(w, "fp8").partition_specs(P(None, "tp")) == Fp8Weight(P("tp", None, None, None), P("tp", None, None))
    assert quantize(w, "int8").partition_specs(P("tp")) == Int8Weight(P("tp"), P(None, None, None))
    assert quantize(w, "int4").partition_specs(P("tp")) == Int4Weight(P("tp"), P("tp"), P("tp"))
    # block scales [*out, in / block_k] shard with their weight [*out, in]
    assert quantize(w, "fp8_block", 32).partition_specs(P("tp")) == Fp8BlockWeight(P(None, None, None, "tp"),
                                                                                    P(None, None, None, "tp"), 32)
    assert quantize(w, "int8", 16).partition_specs(P(None, "tp")) == Int8Weight(P(None, "tp"), P(None, "tp"))


@pytest.mark.parametrize("scheme,kind", [("fp8", Fp8Weight), ("int8", Int8Weight), ("int4", Int4Weight)])
def test_online_quantization_at_load(scheme, kind, tiny_model_dir):
    """Layer weights become leaves (dequantizing close to the float ones); norms, embeddings and
    the LM head stay float."""
    cfg, dense = load_model(tiny_model_dir("llama"), dtype="float32")
    _, params = load_model(tiny_model_dir("llama"), dtype="float32", quantization=scheme)
    for key in ("wqkv", "wo", "w_gate_up", "w_down"):
        leaf = params["layers"][1][key]
        assert isinstance(leaf, kind) and leaf.shape == dense["layers"][1][key].shape
        assert rel_err(leaf.dequantize(), np.asarray(dense["layers"][1][key])) < {"fp8": 0.04, "int8": 0.01, "int4": 0.12}[scheme]
    assert isinstance(params["lm_head"], jax.Array) and isinstance(params["layers"][0]["attn_norm"], jax.Array)


def _with_quantization_config(tiny_model_dir, tmp_path, qc: dict):
    d = shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"quantization_config": qc}))
    return d


@pytest.mark.parametrize("qc,requested,match", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, None, "unsupported quantization format 'bitsandbytes'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, None,
     "unsupported AWQ checkpoint: bits 4, version gemv"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, None, "unsupported GPTQ checkpoint: bits 3"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128, "sym": False}, None,
     "unsupported GPTQ checkpoint: 8 bits, sym False"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"}, None,
     "unsupported fp8 activation_scheme 'static'"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {  # W4A8: int4 weights, int8 activations
        "format": "pack-quantized", "weights": {"type": "int", "num_bits": 4, "strategy": "group"},
        "input_activations": {"type": "int", "num_bits": 8, "strategy": "token", "dynamic": True}}}}, None,
     r"unsupported compressed-tensors scheme: format pack-quantized, weights int4 per group \(static\), "
     r"activations int8 per token \(dynamic\)"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {  # W8A8 int8 with static activation scales
        "format": "int-quantized", "weights": {"type": "int", "num_bits": 8, "strategy": "channel"},
        "input_activations": {"type": "int", "num_bits": 8, "strategy": "tensor", "dynamic": False}}}}, None,
     "format int-quantized, weights int8 per channel .static., activations int8 per tensor .static."),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "format": "pack-quantized", "weights": {"type": "int", "num_bits": 8, "strategy": "group", "symmetric": False}}}},
     None, "weights int8 per group .static, asymmetric."),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, None, "unsupported ModelOpt quant_algo 'NVFP4'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128}, "gptq",
     "quantization 'gptq' does not match the checkpoint's quantization method 'awq'"),
    (None, "awq", "quantization 'awq' needs a checkpoint in that format"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "awq_marlin",
     "quantization 'awq_marlin' does not match the checkpoint's quantization method 'gptq'"),
])
def test_unsupported_quantization_is_one_line_naming_it(qc, requested, match, tiny_model_dir, tmp_path):
    d = _with_quantization_config(tiny_model_dir, tmp_path, qc) if qc else tiny_model_dir("llama")
    with pytest.raises(ConfigError, match=match) as e:
        load_model(d, quantization=requested)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_vllms_marlin_names_serve_the_checkpoints_method(method, tiny_model_dir, tmp_path):
    """`--quantization awq_marlin` / `gptq_marlin` (vLLM's launch lines for AWQ / GPTQ checkpoints
    on its Marlin kernels) give the checkpoint's own scheme, as `awq` / `gptq` and as no flag do."""
    from jaxpaged.engine.config import EngineConfig
    from jaxpaged.models.quantization import load_quantization_config

    d = _with_quantization_config(tiny_model_dir, tmp_path, {"quant_method": method, "bits": 4, "group_size": 128})
    want = load_quantization_config(d)
    assert want.method == method and want.scheme == "int4"
    assert load_quantization_config(d, method) == load_quantization_config(d, f"{method}_marlin") == want
    assert EngineConfig(str(d), quantization=f"{method}_marlin").quantization == f"{method}_marlin"


def test_float8_tensor_without_a_scale_is_an_error(tiny_model_dir, tmp_path):
    """An e4m3 tensor read as a float weight would be off by its missing scale."""
    import torch
    from safetensors.torch import load_file, save_file

    d = shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="model.layers.0.mlp.up_proj.weight is float8_e4m3fn with no weight_scale"):
        load_model(d)


def test_dummy_weights_are_quantized_as_the_checkpoint_says(tiny_model_dir, tmp_path):
    d = _with_quantization_config(tiny_model_dir, tmp_path, {"quant_method": "gptq", "bits": 4, "group_size": 32})
    assert load_quantization_config(d).group_size == 32
    _, params = load_model(d, load_format="dummy")
    leaf = params["layers"][0]["w_down"]
    assert isinstance(leaf, Int4Weight) and leaf.group_size == 32 and leaf.shape == (128, 64)


def test_the_engine_offers_the_methods_the_loader_reads():
    """engine/config.py keeps its own copy of the list (the API server imports no JAX)."""
    from jaxpaged.engine.config import QUANTIZATION_METHODS
    from jaxpaged.models.quantization import QUANTIZATION_CHOICES

    assert QUANTIZATION_METHODS == QUANTIZATION_CHOICES


def test_fp8_and_int4_weights_on_a_gpu_get_a_one_token_bucket(data, monkeypatch):
    """Batch-1 decode of fp8 weights takes the reduce form, and of int4 weights in groups of
    128+ the kernel's FMA form, only in a 1-token step: the engine's buckets gain one where the
    params hold such weights and the backend is a GPU (int4: where the kernel runs)."""
    from jaxpaged.engine.buckets import token_buckets
    from jaxpaged.models.quantization import kernels

    x, w = data
    fp8 = {"layers": {"q": quantize(jnp.asarray(w), "fp8")}, "embed": jnp.zeros((4, 4))}
    int4 = {"layers": {"q": quantize(jnp.asarray(np.resize(w, (128, 16))), "int4", 32)}}
    int4_128 = {"layers": {"q": quantize(jnp.asarray(np.resize(w, (256, 16))), "int4", 128)}}
    assert kernels.small_step_buckets(fp8) == kernels.small_step_buckets(int4_128) == ()  # CPU: one form
    monkeypatch.setattr(kernels.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(kernels.jax, "device_count", lambda: 1)  # the tests' CPU devices are several
    assert kernels.small_step_buckets(int4) == ()  # groups of 32: the MMA form at every size
    assert kernels.small_step_buckets(int4_128) == (1,)
    assert kernels.small_step_buckets(fp8) == (kernels.FP8_REDUCE_MAX_TOKENS,) == (1,)
    assert token_buckets(2048, 256, extra=kernels.small_step_buckets(fp8))[:2] == [1, 16]
    monkeypatch.setattr(kernels.jax, "device_count", lambda: 2)  # a weight without a layout on a mesh: no kernel
    assert kernels.small_step_buckets(int4_128) == ()
