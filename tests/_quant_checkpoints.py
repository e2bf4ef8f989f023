"""Quantized checkpoints of a tiny float model, written in numpy (torch only to save float8) as the
quantization tools lay them out, independently of jaxpaged's readers, and beside each the float
checkpoint of its dequantized weights (the oracle HF transformers runs).

Layouts (HF linear weights are [out, in]):
- compressed-tensors fp8 (llm-compressor's FP8_DYNAMIC / FP8 presets): `weight` F8_E4M3 [out, in],
  `weight_scale` in the model dtype, [out, 1] per channel or [1] per tensor, static `input_scale` [1];
- ModelOpt FP8 (`export_hf_checkpoint`): `weight` F8_E4M3, `weight_scale` and `input_scale` F32
  scalars, hf_quant_config.json {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8"}};
- AWQ GEMM (AutoAWQ's WQLinear_GEMM): `qweight` [in, out / 8] int32 with channel 8c + ORDER[j] in
  bits 4j of word c, ORDER = 0 2 4 6 1 3 5 7; `qzeros` [in / g, out / 8] packed alike; `scales`
  [in / g, out] float16;
- GPTQ (AutoGPTQ / GPTQModel, checkpoint_format gptq): `qweight` [in / 8, out] int32 with input
  row 8i + j in bits 4j of word i; `qzeros` [in / g, out / 8] with channel 8c + j in bits 4j,
  each zero stored minus one; `scales` [in / g, out] float16; `g_idx` [in] int32 (symmetric:
  the LM head too, GPTQModel's `lm_head=True`).
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


def quantize_module(fmt: str, w: np.ndarray, group: int, input_scale: float) -> tuple[dict, np.ndarray]:
    """One HF linear `weight` [out, in] in `fmt` -> (its tensors by suffix, the dequantized weight)."""
    amax = np.abs(w).max(1, keepdims=True)
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
    sym = fmt == "gptq-sym"
    q, zero, scale, deq = _int4_groups(w, group, sym=sym)
    return {"qweight": _pack_rows(q), "qzeros": _pack_cols(zero - 1, list(range(8))), "scales": scale,
            "g_idx": (np.arange(w.shape[1]) // group).astype(np.int32)}, deq


def quantization_config(fmt: str, group: int) -> dict:
    if fmt.startswith("ct-fp8"):
        static = fmt == "ct-fp8-static"
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": not static,
                "strategy": "tensor" if static else "token"}
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                   "strategy": "tensor" if static else "channel"}
        return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
                "ignore": ["lm_head"], "kv_cache_scheme": None}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None}
    return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": fmt == "gptq-sym",
            "checkpoint_format": "gptq", "true_sequential": True, "static_groups": False, "lm_head": fmt == "gptq-sym"}


def write_quantized(src: Path, out: Path, fmt: str, group: int = 32, input_scale: float = 4 / E4M3_MAX) -> tuple[Path, Path]:
    """The float checkpoint `src` in `fmt` (ct-fp8-dynamic, ct-fp8-static, modelopt-fp8, awq, gptq,
    gptq-sym) at out/fmt, and its dequantized float checkpoint at out/fmt-dequantized."""
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
