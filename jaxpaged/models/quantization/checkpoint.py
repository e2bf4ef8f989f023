"""Quantized linear weights of a checkpoint as weight leaves, one HF module at a time, from the
tensors each format stores beside (or instead of) `<module>.weight`:

- fp8 (compressed-tensors, ModelOpt, vLLM's fp8): `weight` e4m3 `[out, in]`, `weight_scale` per
  tensor or per output channel (`[out]`, `[out, 1]`), and with static activation scales
  `input_scale` per tensor;
- AWQ (GEMM layout): `qweight` int32 `[in, out / 8]` (output channel 8c + ORDER[j] in bits 4j of
  word c), `qzeros` int32 `[in / g, out / 8]` packed alike, `scales` `[in / g, out]`;
- GPTQ: `qweight` int32 `[in / 8, out]` (input row 8i + j in bits 4j of word i), `qzeros` int32
  `[in / g, out / 8]` (output channel 8c + j in bits 4j; the v1 format stores zero - 1), `scales`
  `[in / g, out]`, `g_idx` `[in]` (each input row's group).

A module without those tensors is a float one (`read_quantized` returns None)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jaxpaged.models.config import ConfigError
from jaxpaged.models.quantization.config import QuantizationConfig
from jaxpaged.models.quantization.weights import FP8, Fp8Weight, Int4Weight, QuantizedWeight, pack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds output channel 8c + AWQ_ORDER[j]
_AWQ_UNDO = np.argsort(AWQ_ORDER)  # output channel 8c + k is in nibble _AWQ_UNDO[k]


def read_quantized(qc: QuantizationConfig, module: str, raw: Callable[[str], np.ndarray],
                   has: Callable[[str], bool]) -> QuantizedWeight | None:
    """The leaf of HF linear module `module` (a tensor name without `.weight`) if the checkpoint
    stores it quantized. `raw(name)` reads a tensor as stored, `has(name)` says if there is one."""
    if qc.scheme == "fp8":
        return _fp8(qc, module, raw, has) if has(f"{module}.weight_scale") else None
    if not has(f"{module}.qweight"):
        return None
    return (_awq if qc.method == "awq" else _gptq)(qc, module, raw, has)


def _fp8(qc: QuantizationConfig, module: str, raw, has) -> Fp8Weight:
    w = np.asarray(raw(f"{module}.weight"))
    if w.dtype != FP8:
        raise ConfigError(f"{module}.weight is {w.dtype}, expected float8_e4m3fn beside its weight_scale")
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
    return Fp8Weight(w, scale, input_scale)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """int32 [..., n] -> [..., n, 8]: nibble j (bits 4j..4j+3) of each word."""
    words = packed.astype(np.int64)[..., None] & 0xFFFFFFFF
    return ((words >> (4 * np.arange(8))) & 0xF).astype(np.uint8)


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
    if has(f"{module}.g_idx"):
        g_idx = np.asarray(raw(f"{module}.g_idx"))
        if not np.array_equal(g_idx, np.arange(num_in) // group):
            raise ConfigError(f"{module}.g_idx reorders the input rows (GPTQ desc_act / act-order): not supported")
    zeros = _nibbles(qzeros).reshape(qzeros.shape[0], -1).astype(np.uint8) + np.uint8(qc.zero_offset)
    return Int4Weight(qweight.astype(np.int32), scales, zeros)
