"""Quantized linear weights of a checkpoint as weight leaves, one HF module at a time, from the
tensors each format stores beside (or instead of) `<module>.weight`:

- fp8 (compressed-tensors, ModelOpt, vLLM's fp8, FBGEMM's): `weight` e4m3 `[out, in]`,
  `weight_scale` per tensor or per output channel (`[out]`, `[out, 1]`), and with static
  activation scales `input_scale` per tensor;
- block fp8 (`weight_block_size` [bn, bk]; compressed-tensors' block strategy): `weight` e4m3,
  `weight_scale_inv` (compressed-tensors: `weight_scale`) float32 `[ceil(out / bn), ceil(in / bk)]`;
- AWQ (GEMM layout): `qweight` int32 `[in, out / 8]` (output channel 8c + ORDER[j] in bits 4j of
  word c), `qzeros` int32 `[in / g, out / 8]` packed alike, `scales` `[in / g, out]`;
- GPTQ: `qweight` int32 `[in / 8, out]` (input row 8i + j in bits 4j of word i), `qzeros` int32
  `[in / g, out / 8]` (output channel 8c + j in bits 4j; the v1 format stores zero - 1), `scales`
  `[in / g, out]`, `g_idx` `[in]` (each input row's group); 8 bits: four to a word alike;
- compressed-tensors pack-quantized (int4, int8): `weight_packed` int32 `[out, in * bits / 32]`
  (input column (32 / bits) c + j in bits `bits * j` of word c, stored as q + 2^(bits-1)),
  `weight_shape` `[out, in]`, `weight_scale` `[out, in / g]` (`[out, 1]` per channel), asymmetric
  `weight_zero_point` int32 `[out * bits / 32, in / g]` packed alike along the output axis,
  act-order `weight_g_idx` `[in]` (int4 and int8);
- compressed-tensors int-quantized (W8A8 int8): `weight` int8 `[out, in]`, `weight_scale` `[out, 1]`.

A module without those tensors is a float one (`read_quantized` returns None)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jaxpaged.kernels.fp8_quant import FP8
from jaxpaged.models.config import ConfigError
from jaxpaged.models.quantization.config import QuantizationConfig
from jaxpaged.models.quantization.packing import pack_int4
from jaxpaged.models.quantization.weights import (Fp8BlockWeight, Fp8Weight, Int4Weight, Int8W8A8Weight,
                                                  Int8Weight, QuantizedWeight)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds output channel 8c + AWQ_ORDER[j]
_AWQ_UNDO = np.argsort(AWQ_ORDER)  # output channel 8c + k is in nibble _AWQ_UNDO[k]


def read_quantized(qc: QuantizationConfig, module: str, raw: Callable[[str], np.ndarray],
                   has: Callable[[str], bool]) -> QuantizedWeight | None:
    """The leaf of HF linear module `module` (a tensor name without `.weight`) if the checkpoint
    stores it quantized. `raw(name)` reads a tensor as stored, `has(name)` says if there is one."""
    if qc.scheme == "fp8":
        return _fp8(qc, module, raw, has) if has(f"{module}.weight_scale") else None
    if qc.scheme == "fp8_block":
        scale = f"{module}.weight_scale_inv" if qc.method == "fp8" else f"{module}.weight_scale"
        return _fp8_block(qc, module, raw, scale) if has(scale) else None
    if qc.method == "compressed-tensors":
        if qc.scheme == "int8_w8a8":
            return _ct_int8_w8a8(module, raw) if has(f"{module}.weight_scale") else None
        return _ct_packed(qc, module, raw, has) if has(f"{module}.weight_packed") else None
    if not has(f"{module}.qweight"):
        return None
    if qc.method == "gptq" and qc.scheme == "int8":
        return _gptq_int8(qc, module, raw, has)
    return (_awq if qc.method == "awq" else _gptq)(qc, module, raw, has)


def _e4m3(module: str, raw) -> np.ndarray:
    w = np.asarray(raw(f"{module}.weight"))
    if w.dtype != FP8:
        raise ConfigError(f"{module}.weight is {w.dtype}, expected float8_e4m3fn beside its weight_scale")
    return w


def _fp8(qc: QuantizationConfig, module: str, raw, has) -> Fp8Weight:
    w = _e4m3(module, raw)
    out = w.shape[0]
    scale = np.asarray(raw(f"{module}.weight_scale"), np.float32)
    if scale.size not in (1, out):
        raise ConfigError(f"{module}.weight_scale has shape {scale.shape}: expected one scale per tensor or per "
                          f"output channel ({out})")
    scale = np.broadcast_to(scale.reshape(-1), (out,)).copy()
    input_scale = None
    if qc.static_input_scale:
        if not has(f"{module}.input_scale"):
            raise ConfigError(f"checkpoint is missing tensor {module}.input_scale (static fp8 activation scales)")
        input_scale = np.float32(np.asarray(raw(f"{module}.input_scale"), np.float32).max())
    ub = None if qc.input_scale_ub is None else np.float32(qc.input_scale_ub)
    return Fp8Weight(w, scale, input_scale, ub)


def _fp8_block(qc: QuantizationConfig, module: str, raw, scale_name: str) -> Fp8BlockWeight:
    w = _e4m3(module, raw)
    (out, num_in), bn, bk = w.shape, qc.block_n, qc.group_size
    scale = np.asarray(raw(scale_name), np.float32)
    want = (-(-out // bn), -(-num_in // bk))
    if scale.shape != want:
        raise ConfigError(f"{scale_name} has shape {scale.shape}: expected {want}, one scale per block of "
                          f"[{bn}, {bk}] of the [{out}, {num_in}] weight")
    return Fp8BlockWeight(w, np.repeat(scale, bn, axis=0)[:out], bk)


def _nibbles(packed: np.ndarray, bits: int = 4) -> np.ndarray:
    """int32 [..., n] -> [..., n, 32 / bits]: field j (bits `bits * j` up) of each word."""
    words = packed.astype(np.int64)[..., None] & 0xFFFFFFFF
    return ((words >> (bits * np.arange(32 // bits))) & ((1 << bits) - 1)).astype(np.uint8)


def _group_rows(qc: QuantizationConfig, module: str, num_in: int, scales: np.ndarray) -> int:
    """Input rows per group, as the scales' shape says and the config's group_size agrees."""
    groups = scales.shape[0]
    want = num_in if qc.group_size == -1 else qc.group_size
    if groups * want != num_in:
        raise ConfigError(f"{module}.scales has {groups} groups for {num_in} input rows, not groups of "
                          f"group_size {qc.group_size}")
    return want


def _awq(qc: QuantizationConfig, module: str, raw, has) -> Int4Weight:
    qweight, qzeros, scales = (np.asarray(raw(f"{module}.{n}")) for n in ("qweight", "qzeros", "scales"))
    values = _nibbles(qweight)[..., _AWQ_UNDO].reshape(qweight.shape[0], -1)  # [in, out]
    zeros = _nibbles(qzeros)[..., _AWQ_UNDO].reshape(qzeros.shape[0], -1)
    _group_rows(qc, module, values.shape[0], scales)
    return Int4Weight(np.asarray(pack_int4(values)), scales, zeros)


def _gptq(qc: QuantizationConfig, module: str, raw, has) -> Int4Weight:
    qweight, qzeros, scales = (np.asarray(raw(f"{module}.{n}")) for n in ("qweight", "qzeros", "scales"))
    num_in = qweight.shape[0] * 8
    group = _group_rows(qc, module, num_in, scales)
    zeros = _nibbles(qzeros).reshape(qzeros.shape[0], -1).astype(np.uint8) + np.uint8(qc.zero_offset)
    return _int4(qweight.astype(np.int32), scales, zeros, _act_order(f"{module}.g_idx", raw, has, num_in, group))


def _gptq_int8(qc: QuantizationConfig, module: str, raw, has) -> Int8Weight:
    """GPTQ 8-bit, symmetric: `qweight` int32 `[in / 4, out]` (input row 4i + j in bits 8j of
    word i), every zero point 128 (the v1 format stores 127), so w = (q - 128) * scale; act-order
    rows sorted by group (`Int8Weight.act_order`)."""
    qweight, qzeros, scales = (np.asarray(raw(f"{module}.{n}")) for n in ("qweight", "qzeros", "scales"))
    values = _nibbles(qweight.T, 8).reshape(qweight.shape[1], -1).T  # [in, out], q
    group = _group_rows(qc, module, values.shape[0], scales)
    zeros = _nibbles(qzeros, 8).reshape(qzeros.shape[0], -1).astype(np.int32) + qc.zero_offset
    if not (zeros == 128).all():
        raise ConfigError(f"{module}.qzeros holds zero points other than 128: asymmetric 8-bit GPTQ is not supported")
    q = (values.astype(np.int16) - 128).astype(np.int8)
    scale = scales.astype(np.float32)
    return _int8(q, scale, group < values.shape[0], _act_order(f"{module}.g_idx", raw, has, values.shape[0], group))


def _int8(q: np.ndarray, scales: np.ndarray, grouped: bool, g_idx: np.ndarray | None) -> Int8Weight:
    """The int8 leaf from `scales` `[in / g, out]`: per group, or (not `grouped`) per channel;
    an act-order one (`g_idx`) with its rows sorted by group (`Int8Weight.act_order`)."""
    if g_idx is not None:
        return Int8Weight.act_order(q, scales, g_idx)
    return Int8Weight(q, scales if grouped else scales[0])


def _int4(qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g_idx: np.ndarray | None) -> Int4Weight:
    """The int4 leaf; an act-order one (`g_idx`) with its rows sorted by group (`Int4Weight.act_order`)."""
    return Int4Weight(qweight, scales, zeros) if g_idx is None else Int4Weight.act_order(qweight, scales, zeros, g_idx)


def _act_order(name: str, raw, has, num_in: int, group: int) -> np.ndarray | None:
    """The input rows' groups if `name` reorders them (act-order), None if absent or consecutive."""
    if not has(name):
        return None
    g_idx = np.asarray(raw(name)).astype(np.int32)
    if g_idx.shape != (num_in,) or g_idx.min() < 0 or g_idx.max() >= num_in // group:
        raise ConfigError(f"{name} has shape {g_idx.shape} or groups out of range for {num_in} input rows in "
                          f"groups of {group}")
    return None if np.array_equal(g_idx, np.arange(num_in) // group) else g_idx


def _ct_packed(qc: QuantizationConfig, module: str, raw, has) -> Int4Weight | Int8Weight:
    """compressed-tensors pack-quantized int4 / int8 (vLLM's CompressedTensorsWNA16)."""
    bits = 4 if qc.scheme == "int4" else 8
    out, num_in = (int(v) for v in np.asarray(raw(f"{module}.weight_shape")).reshape(-1))
    packed = np.asarray(raw(f"{module}.weight_packed"))
    values = _nibbles(packed, bits).reshape(out, -1)[:, :num_in].T  # [in, out], q + 2^(bits-1)
    scale = np.asarray(raw(f"{module}.weight_scale"))  # [out, groups]
    group = num_in if qc.group_size in (0, -1) else qc.group_size
    if scale.shape != (out, num_in // group) or num_in % group:
        raise ConfigError(f"{module}.weight_scale has shape {scale.shape}: expected ({out}, {num_in // group}) for "
                          f"groups of {group} input rows")
    g_idx = _act_order(f"{module}.weight_g_idx", raw, has, num_in, group)
    if bits == 8:
        return _int8((values.astype(np.int16) - 128).astype(np.int8), scale.T.astype(np.float32), qc.group_size > 0,
                     g_idx)
    if num_in % 8:
        raise ConfigError(f"{module} has {num_in} input rows, not a multiple of 8 (int4 packing)")
    zp_name = f"{module}.weight_zero_point"
    if not qc.symmetric and not has(zp_name):
        raise ConfigError(f"checkpoint is missing tensor {zp_name} (asymmetric weights)")
    if has(zp_name):  # packed along the output axis: [out / 8, groups] -> [groups, out]
        zeros = _nibbles(np.asarray(raw(zp_name)).T).reshape(scale.shape[1], -1)[:, :out]
    else:
        zeros = np.full(scale.T.shape, 8, np.uint8)
    return _int4(np.asarray(pack_int4(values)), scale.T, zeros, g_idx)


def _ct_int8_w8a8(module: str, raw) -> Int8W8A8Weight:
    """compressed-tensors int-quantized W8A8 (vLLM's CompressedTensorsW8A8Int8)."""
    w = np.asarray(raw(f"{module}.weight"))
    scale = np.asarray(raw(f"{module}.weight_scale"), np.float32).reshape(-1)
    if w.dtype != np.int8 or scale.shape != (w.shape[0],):
        raise ConfigError(f"{module}: expected an int8 weight [out, in] and a weight_scale per output channel, "
                          f"got {w.dtype} {w.shape} and {scale.shape}")
    return Int8W8A8Weight(np.ascontiguousarray(w.T), scale)
