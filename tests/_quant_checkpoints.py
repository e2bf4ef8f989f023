"""Quantized checkpoints of a tiny float model, written in numpy (torch only to save float8) as the
quantization tools lay them out, independently of jaxpaged's readers, and beside each the float
checkpoint of its dequantized weights (the oracle HF transformers runs).

Layouts (HF linear weights are [out, in]):
- compressed-tensors fp8 (llm-compressor's FP8_DYNAMIC / FP8 presets): `weight` F8_E4M3 [out, in],
  `weight_scale` in the model dtype, [out, 1] per channel or [1] per tensor, static `input_scale` [1];
- ModelOpt FP8 (`export_hf_checkpoint`): `weight` F8_E4M3, `weight_scale` and `input_scale` F32
  scalars, hf_quant_config.json {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8"}};
- FBGEMM fp8 (Meta's Llama 3.1 FP8): `weight` F8_E4M3, `weight_scale` F32 [out, 1], config
  {"quant_method": "fbgemm_fp8", "activation_scale_ub": ..., "modules_to_not_convert": [...]};
- AWQ GEMM (AutoAWQ's WQLinear_GEMM): `qweight` [in, out / 8] int32 with channel 8c + ORDER[j] in
  bits 4j of word c, ORDER = 0 2 4 6 1 3 5 7; `qzeros` [in / g, out / 8] packed alike; `scales`
  [in / g, out] float16;
- GPTQ (AutoGPTQ / GPTQModel, checkpoint_format gptq): `qweight` [in / 8, out] int32 with input
  row 8i + j in bits 4j of word i; `qzeros` [in / g, out / 8] with channel 8c + j in bits 4j,
  each zero stored minus one; `scales` [in / g, out] float16; `g_idx` [in] int32 (symmetric:
  the LM head too, GPTQModel's `lm_head=True`; act-order: the groups are of rows in a random
  order, g_idx[row] its group; 8 bits, symmetric: 4 rows to a word, q + 128, zeros stored as 127);
- block fp8 (Qwen3-FP8 / DeepSeek-V3 `weight_block_size` [bn, bk]): `weight` F8_E4M3,
  `weight_scale_inv` F32 [ceil(out / bn), ceil(in / bk)] (compressed-tensors FP8_BLOCK: `weight_scale`);
- compressed-tensors pack-quantized (W4A16, W8A16): signed q + 2^(bits-1) packed 32 / bits to an
  int32 along the input axis (column (32 / bits) c + j in bits `bits * j`) as `weight_packed`,
  `weight_shape` [out, in], `weight_scale` [out, in / g] float16, asymmetric `weight_zero_point`
  (signed, offset alike) packed along the output axis [out / 8, in / g], act-order `weight_g_idx` [in];
- compressed-tensors int-quantized W8A8: `weight` int8 [out, in], `weight_scale` [out, 1].
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
E4M3_MAX = 448.0
FBGEMM_UB = 1200.0  # Meta's checkpoints' activation_scale_ub
BLOCKS = {"fp8-block": [48, 32], "ct-fp8-block": [32, 48]}  # [bn, bk]; 48 leaves partial blocks of 64 and 128


def _fp8(w: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(e4m3 values of w / scale, their dequantized float32)."""
    q = np.clip(w / scale, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    return q, q.astype(np.float32) * scale


def _int4_groups(w: np.ndarray, g: int, sym: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """w [out, in] -> (q [in, out], zeros [in/g, out], fp16 scales [in/g, out], dequantized [out, in])."""
    wt = w.T.reshape(w.shape[1] // g, g, w.shape[0])
    if sym:
        scale = (np.abs(wt).max(1) * 2 / 15).astype(np.float16)
        zero = np.full(scale.shape, 8)
    else:
        lo, hi = np.minimum(wt.min(1), 0), np.maximum(wt.max(1), 0)
        scale = ((hi - lo) / 15).astype(np.float16)
        zero = np.clip(np.round(-lo / scale.astype(np.float32)), 0, 15).astype(np.int64)
    s32 = scale.astype(np.float32)[:, None]
    q = np.clip(np.round(wt / s32) + zero[:, None], 0, 15).astype(np.int64)
    deq = ((q - zero[:, None]) * s32).reshape(w.shape[1], w.shape[0]).T
    return q.reshape(w.shape[1], w.shape[0]), zero, scale, deq


def _pack_cols(v: np.ndarray, order: list[int]) -> np.ndarray:
    """[rows, cols] nibbles -> int32 [rows, cols / 8]: column 8c + order[j] in bits 4j of word c."""
    out = np.zeros((v.shape[0], v.shape[1] // 8), np.int64)
    for j, col in enumerate(order):
        out |= (v[:, col::8] & 0xF) << (4 * j)
    return out.astype(np.uint32).view(np.int32)


def _pack_rows(v: np.ndarray) -> np.ndarray:
    """[rows, cols] nibbles -> int32 [rows / 8, cols]: row 8i + j in bits 4j of word i."""
    out = np.zeros((v.shape[0] // 8, v.shape[1]), np.int64)
    for j in range(8):
        out |= (v[j::8] & 0xF) << (4 * j)
    return out.astype(np.uint32).view(np.int32)


def _pack_int(q: np.ndarray, bits: int) -> np.ndarray:
    """Signed [rows, cols] -> int32 [rows, cols * bits / 32]: q + 2^(bits-1) of column (32 / bits) c + j
    in bits `bits * j` of word c (compressed-tensors' pack_to_int32)."""
    per = 32 // bits
    u = (q.astype(np.int64) + (1 << (bits - 1))).reshape(q.shape[0], -1, per)
    return (u << (bits * np.arange(per))).sum(-1).astype(np.uint32).view(np.int32)


def _fp8_blocks(w: np.ndarray, bn: int, bk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [out, in] -> (e4m3 values, float32 scales [ceil(out / bn), ceil(in / bk)], dequantized)."""
    scale = np.zeros((-(-w.shape[0] // bn), -(-w.shape[1] // bk)), np.float32)
    for i, j in np.ndindex(*scale.shape):
        scale[i, j] = np.abs(w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]).max() / E4M3_MAX
    full = np.repeat(np.repeat(scale, bn, 0), bk, 1)[:w.shape[0], :w.shape[1]]
    q, deq = _fp8(w, full)
    return q, scale, deq


def _ct_int(w: np.ndarray, bits: int, group: int, sym: bool, act_order: bool) -> tuple[dict, np.ndarray]:
    """compressed-tensors int weights in groups of `group` input columns (0: per channel), with
    act-order the groups of columns in a random order (`weight_g_idx`): signed q, scale
    (float16), signed zero point; (tensors, dequantized)."""
    g = group or w.shape[1]
    perm = np.random.default_rng(w.shape[1]).permutation(w.shape[1]) if act_order else np.arange(w.shape[1])
    inv = np.argsort(perm)
    wg = w[:, perm].reshape(w.shape[0], -1, g)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if sym:
        scale, zero = np.abs(wg).max(-1) * 2 / (qmax - qmin), np.zeros(wg.shape[:2], np.int64)
    else:
        lo, hi = np.minimum(wg.min(-1), 0), np.maximum(wg.max(-1), 0)
        scale = (hi - lo) / (qmax - qmin)
        zero = np.clip(np.round(qmin - lo / scale.astype(np.float16).astype(np.float32)), qmin, qmax).astype(np.int64)
    scale = scale.astype(np.float16)
    s32 = scale.astype(np.float32)[..., None]
    q = np.clip(np.round(wg / s32) + zero[..., None], qmin, qmax).astype(np.int64)
    deq = ((q - zero[..., None]) * s32).reshape(w.shape)[:, inv]
    tensors = {"weight_packed": _pack_int(q.reshape(w.shape)[:, inv], bits), "weight_scale": scale,
               "weight_shape": np.array(w.shape, np.int64)}
    if not sym:
        tensors["weight_zero_point"] = np.ascontiguousarray(_pack_int(zero.T, bits).T)
    if act_order:
        tensors["weight_g_idx"] = (inv // g).astype(np.int32)
    return tensors, deq


def quantize_module(fmt: str, w: np.ndarray, group: int, input_scale: float) -> tuple[dict, np.ndarray]:
    """One HF linear `weight` [out, in] in `fmt` (ct-fp8-dynamic, ct-fp8-static, modelopt-fp8, fbgemm-fp8, awq,
    gptq, gptq-sym, gptq-act-order, gptq-8bit(-act-order), fp8-block, ct-fp8-block, ct-w4a16 (per channel), ct-w4a16-asym
    (act-order too), ct-w8a16 (act-order too), ct-w8a8-int8) -> (its tensors by suffix, the dequantized weight)."""
    amax = np.abs(w).max(1, keepdims=True)
    if fmt in ("fp8-block", "ct-fp8-block"):
        q, scale, deq = _fp8_blocks(w, *BLOCKS[fmt])
        return {"weight": q, "weight_scale_inv" if fmt == "fp8-block" else "weight_scale": scale}, deq
    if fmt.startswith("ct-w"):
        if fmt == "ct-w8a8-int8":
            scale = (amax / 127).astype(np.float16)
            q = np.clip(np.round(w / scale.astype(np.float32)), -127, 127).astype(np.int8)
            return {"weight": q, "weight_scale": scale}, q * scale.astype(np.float32)
        asym = fmt == "ct-w4a16-asym"  # with act-order (llm-compressor's GPTQ actorder="group")
        return _ct_int(w, 8 if "w8" in fmt else 4, 0 if fmt == "ct-w4a16" else group, not asym,
                       asym or fmt == "ct-w8a16-act-order")
    if fmt == "fbgemm-fp8":
        scale = (amax / E4M3_MAX).astype(np.float32)
        q, deq = _fp8(w, scale)
        return {"weight": q, "weight_scale": scale}, deq
    if fmt == "ct-fp8-dynamic":  # llm-compressor keeps scales in the model dtype (bf16 here)
        scale = (amax / E4M3_MAX).astype(ml_dtypes.bfloat16).astype(np.float32)
        q, deq = _fp8(w, scale)
        return {"weight": q, "weight_scale": scale.astype(ml_dtypes.bfloat16)}, deq
    if fmt in ("ct-fp8-static", "modelopt-fp8"):
        scale = np.float32(amax.max() / E4M3_MAX)
        q, deq = _fp8(w, scale)
        shape = (1,) if fmt == "ct-fp8-static" else ()
        return {"weight": q, "weight_scale": np.full(shape, scale, np.float32),
                "input_scale": np.full(shape, input_scale, np.float32)}, deq
    if fmt == "awq":
        q, zero, scale, deq = _int4_groups(w, group, sym=False)
        return {"qweight": _pack_cols(q, AWQ_ORDER), "qzeros": _pack_cols(zero, AWQ_ORDER), "scales": scale}, deq
    if fmt.startswith("gptq-8bit"):  # symmetric groups: q = round(w / scale) + 128, zeros stored as 127 (v1)
        act_order = fmt == "gptq-8bit-act-order"
        perm = np.random.default_rng(w.shape[1]).permutation(w.shape[1]) if act_order else np.arange(w.shape[1])
        inv = np.argsort(perm)  # as in the 4-bit act-order layout below
        g = w[:, perm].reshape(w.shape[0], -1, group)  # [out, in / g, g] in the quantization order
        scale = (np.abs(g).max(-1) / 127).T.astype(np.float16)  # [in / g, out]
        s = np.repeat(scale.astype(np.float32).T, group, axis=1)  # [out, in]
        q = (np.clip(np.round(w[:, perm] / s), -127, 127) + 128).astype(np.int64).T[inv]  # [in, out]
        words = (q.reshape(-1, 4, q.shape[1]) << (8 * np.arange(4))[None, :, None]).sum(1)
        zeros = np.full((scale.shape[0], w.shape[0] // 4), 0x7F7F7F7F, np.int64)
        return {"qweight": words.astype(np.uint32).view(np.int32), "qzeros": zeros.astype(np.uint32).view(np.int32),
                "scales": scale, "g_idx": (inv // group).astype(np.int32)}, (q.T - 128) * s[:, inv]
    sym = fmt == "gptq-sym"
    act_order = fmt == "gptq-act-order"
    perm = np.random.default_rng(w.shape[1]).permutation(w.shape[1]) if act_order else np.arange(w.shape[1])
    inv = np.argsort(perm)  # input row r is at inv[r] in the quantization order, so in group inv[r] // group
    q, zero, scale, deq = _int4_groups(w[:, perm], group, sym=sym)
    return {"qweight": _pack_rows(q[inv]), "qzeros": _pack_cols(zero - 1, list(range(8))), "scales": scale,
            "g_idx": (inv // group).astype(np.int32)}, deq[:, inv]


def quantization_config(fmt: str, group: int) -> dict:
    if fmt == "fp8-block":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": BLOCKS[fmt]}
    if fmt == "ct-fp8-block":
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "block",
                   "block_structure": BLOCKS[fmt]}
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "group",
                "group_size": BLOCKS[fmt][1]}
        return _ct_config("float-quantized", weights, acts)
    if fmt.startswith("ct-w"):
        int8_acts = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token"}
        channel = fmt in ("ct-w4a16", "ct-w8a8-int8")  # the others in groups
        weights = {"num_bits": 8 if "w8" in fmt else 4, "type": "int", "symmetric": not fmt.endswith("-asym"),
                   "dynamic": False, "strategy": "channel" if channel else "group",
                   "group_size": None if channel else group, "actorder": "group" if fmt in ("ct-w4a16-asym", "ct-w8a16-act-order") else None}
        if fmt == "ct-w8a8-int8":
            return _ct_config("int-quantized", weights, int8_acts)
        return _ct_config("pack-quantized", weights, None)
    if fmt.startswith("ct-fp8"):
        static = fmt == "ct-fp8-static"
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": not static,
                "strategy": "tensor" if static else "token"}
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                   "strategy": "tensor" if static else "channel"}
        return _ct_config("float-quantized", weights, acts)
    if fmt == "fbgemm-fp8":
        return {"quant_method": "fbgemm_fp8", "activation_scale_ub": FBGEMM_UB,
                "modules_to_not_convert": ["lm_head"]}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None}
    return {"quant_method": "gptq", "bits": 8 if fmt.startswith("gptq-8bit") else 4, "group_size": group,
            "desc_act": fmt.endswith("act-order"), "sym": fmt == "gptq-sym" or fmt.startswith("gptq-8bit"),
            "checkpoint_format": "gptq", "true_sequential": True, "static_groups": False,
            "lm_head": fmt == "gptq-sym"}


def _ct_config(fmt: str, weights: dict, acts: dict | None) -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
            "ignore": ["lm_head"], "kv_cache_scheme": None}


def write_quantized(src: Path, out: Path, fmt: str, group: int = 32, input_scale: float = 4 / E4M3_MAX) -> tuple[Path, Path]:
    """The float checkpoint `src` in `fmt` (a `quantize_module` format) at out/fmt, and its
    dequantized float checkpoint at out/fmt-dequantized."""
    quantized, dequantized = out / fmt, out / f"{fmt}-dequantized"
    for d in (quantized, dequantized):
        shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.safetensors*"))
    tensors = load_file(src / "model.safetensors")
    q_tensors, dq_tensors = {}, dict(tensors)
    for name, w in tensors.items():
        if not (LINEAR.match(name) or (fmt == "gptq-sym" and name == "lm_head.weight")):  # GPTQModel's lm_head=True
            q_tensors[name] = w
            continue
        module = name.removesuffix(".weight")
        parts, deq = quantize_module(fmt, w, group, input_scale)
        q_tensors |= {f"{module}.{k}": v for k, v in parts.items()}
        dq_tensors[name] = np.ascontiguousarray(deq, np.float32)  # safetensors.numpy writes any other order as C
    save_file(dq_tensors, dequantized / "model.safetensors", metadata={"format": "pt"})
    _save_with_float8(q_tensors, quantized / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    if fmt == "modelopt-fp8":
        (quantized / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "modelopt", "version": "0.19.0"},
             "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}}))
    else:
        cfg["quantization_config"] = quantization_config(fmt, group)
    (quantized / "config.json").write_text(json.dumps(cfg, indent=2))
    return quantized, dequantized


def decisive_copy(src: Path, out: Path) -> Path:
    """`src` with its LM head twice the embedding table: a random tiny model whose next token is
    mostly its last one by a clear margin, so that greedy tokens are not decided by rounding."""
    shutil.copytree(src, out)
    tensors = load_file(out / "model.safetensors")
    tensors["lm_head.weight"] = 2 * tensors["model.embed_tokens.weight"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _save_with_float8(tensors: dict[str, np.ndarray], path: Path) -> None:
    """safetensors' numpy writer has no float8: torch writes the file."""
    import torch
    from safetensors.torch import save_file as save_torch

    def to_torch(a: np.ndarray):
        if a.dtype == ml_dtypes.float8_e4m3fn:
            return torch.from_numpy(a.view(np.uint8).copy()).view(torch.float8_e4m3fn)
        if a.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(a))

    save_torch({k: to_torch(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
