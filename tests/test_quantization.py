"""Quantized weights in `linear()`: fp8 W8A8, int8 W8A16 and int4 W4A16 against numpy references
that dequantize the stored values exactly (and, for fp8, quantize the activations exactly as
the kernel should); the fp8 GEMM's operands are e4m3 in the lowered StableHLO; online
quantization at load, its flags and its one-line errors."""
from __future__ import annotations

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
from jaxpaged.models.quantization import Fp8Weight, Int4Weight, Int8Weight, load_quantization_config, quantize
from jaxpaged.models.quantization.weights import pack_int4, unpack_int4

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


def ref_int4_weight(w: Int4Weight) -> np.ndarray:
    """Nibble j of word i is input row 8i + j; group g of rows shares scales[g] and zeros[g]."""
    words = np.asarray(w.qweight).astype(np.int64) & 0xFFFFFFFF
    q = np.stack([(words >> (4 * j)) & 0xF for j in range(8)], axis=1).reshape(-1, *words.shape[1:])
    group = q.shape[0] // w.scales.shape[0]
    zeros = np.repeat(np.asarray(w.zeros, np.int64), group, axis=0)
    return (q - zeros) * np.repeat(np.asarray(w.scales, np.float64), group, axis=0)


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
    # against float activations: e4m3's 3 mantissa bits cost a few percent on random data
    assert rel_err(got, np.tensordot(x.astype(np.float64), wq, axes=1)) <= 0.04
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
    (int8_dot,) = _dots(jax.jit(linear).lower(jnp.asarray(x, jnp.bfloat16), quantize(jnp.asarray(w), "int8")).as_text())
    assert "tensor<64x2x4x16xbf16>" in int8_dot  # W8A16: the int8 weight converted to the activations' dtype


def test_leaf_specs_follow_the_dense_spec():
    from jax.sharding import PartitionSpec as P

    w = jnp.zeros((64, 2, 4, 16))
    assert quantize(w, "fp8").partition_specs(P(None, "tp")) == Fp8Weight(P("tp", None, None, None), P("tp", None, None))
    assert quantize(w, "int8").partition_specs(P("tp")) == Int8Weight(P("tp"), P(None, None, None))
    assert quantize(w, "int4").partition_specs(P("tp")) == Int4Weight(P("tp"), P("tp"), P("tp"))


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
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, None, "unsupported GPTQ checkpoint: bits 8"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, None, r"block-wise weight scales \(weight_block_size"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "format": "pack-quantized", "weights": {"type": "int", "num_bits": 4, "strategy": "group"}}}}, None,
     "unsupported compressed-tensors scheme: format pack-quantized, weights int4 per group"),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, None, "unsupported ModelOpt quant_algo 'NVFP4'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128}, "gptq",
     "quantization 'gptq' does not match the checkpoint's quantization method 'awq'"),
    (None, "awq", "quantization 'awq' needs a checkpoint in that format"),
])
def test_unsupported_quantization_is_one_line_naming_it(qc, requested, match, tiny_model_dir, tmp_path):
    d = _with_quantization_config(tiny_model_dir, tmp_path, qc) if qc else tiny_model_dir("llama")
    with pytest.raises(ConfigError, match=match) as e:
        load_model(d, quantization=requested)
    assert "\n" not in str(e.value)


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
