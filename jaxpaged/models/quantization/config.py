"""Which quantization a model is served with: the checkpoint's (`quantization_config` in
config.json, or ModelOpt's hf_quant_config.json) or an online scheme asked for on a float
checkpoint (vLLM's `--quantization`). Anything else is a one-line `ConfigError` naming it."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxpaged.models.config import ConfigError

ONLINE_SCHEMES = ("fp8", "int8", "int4")  # quantized at load from float weights
CHECKPOINT_METHODS = ("compressed-tensors", "modelopt", "fp8", "fbgemm_fp8", "awq", "gptq")  # vLLM's quant_method names
# vLLM's names for an AWQ / GPTQ checkpoint served by its Marlin kernels: here, the method's own (int4 kernel)
KERNEL_ALIASES = {"awq_marlin": "awq", "gptq_marlin": "gptq"}
QUANTIZATION_CHOICES = tuple(dict.fromkeys(ONLINE_SCHEMES + CHECKPOINT_METHODS + tuple(KERNEL_ALIASES)))
_CT_SUPPORTED = ("float-quantized fp8 weights per channel or tensor with fp8 activations per token (dynamic) or "
                 "tensor (static), or per block with dynamic activations; pack-quantized int4 / int8 weights per "
                 "group or channel without activation quantization (int8 symmetric); int-quantized int8 weights per "
                 "channel with dynamic int8 activations per token")
_MODELOPT_ALGOS = {"FP8": True, "FP8_PER_CHANNEL_PER_TOKEN": False}  # quant_algo -> static activation scales


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    method: str  # vLLM's name: the checkpoint's quant_method, or the online scheme
    # the weight leaf: "fp8" (W8A8), "fp8_block" (block scales), "int8" (W8A16), "int8_w8a8", "int4" (W4A16)
    scheme: str
    online: bool = False  # quantized at load from a float checkpoint (or random weights)
    static_input_scale: bool = False  # fp8: each layer's per-tensor activation scale from the checkpoint
    input_scale_ub: float | None = None  # fp8 (fbgemm_fp8): the cap of a token's dynamic activation amax
    # input rows per scale: int4 (-1: all; 0: online's choice), int8 (0: per channel), fp8_block (block_k)
    group_size: int = 0
    block_n: int = 0  # fp8_block: output channels per scale
    zero_offset: int = 0  # int4: added to the stored zero points (GPTQ's v1 format stores them minus one)
    symmetric: bool = True  # compressed-tensors int: no weight_zero_point


def load_quantization_config(model_dir: str | Path, requested: str | None = None) -> QuantizationConfig | None:
    """The checkpoint's quantization, checked against `requested` (vLLM's `quantization`
    argument: it must name the checkpoint's method, or for AWQ / GPTQ vLLM's Marlin name of it),
    or the online scheme `requested` on a float checkpoint; None for a float model served as it is."""
    model_dir = Path(model_dir)
    if requested is not None and requested not in QUANTIZATION_CHOICES:
        raise ConfigError(f"unsupported quantization {requested!r}; choose from {', '.join(QUANTIZATION_CHOICES)}")
    found = _checkpoint_quantization(model_dir)
    if found is None:
        if requested is None:
            return None
        if requested in ONLINE_SCHEMES:
            return QuantizationConfig(requested, requested, online=True)
        raise ConfigError(f"quantization {requested!r} needs a checkpoint in that format; {model_dir} has no "
                          "quantization_config")
    config = parse_quantization_config(found)
    if requested not in (None, config.method, *(a for a, m in KERNEL_ALIASES.items() if m == config.method)):
        raise ConfigError(f"quantization {requested!r} does not match the checkpoint's quantization method "
                          f"{config.method!r}")
    return config


def _checkpoint_quantization(model_dir: Path) -> dict | None:
    """config.json's `quantization_config`, or ModelOpt's hf_quant_config.json (method `modelopt`)."""
    cfg_file = model_dir / "config.json"
    found = json.loads(cfg_file.read_text()).get("quantization_config") if cfg_file.is_file() else None
    sidecar = model_dir / "hf_quant_config.json"
    if found is None and sidecar.is_file():
        found = {"quant_method": "modelopt", **json.loads(sidecar.read_text())}
    return found


def parse_quantization_config(qc: dict) -> QuantizationConfig:
    """A checkpoint's quantization config dict -> `QuantizationConfig`."""
    method = str(qc.get("quant_method", "")).lower()
    parse = {"compressed-tensors": _compressed_tensors, "modelopt": _modelopt, "fp8": _fp8,
             "fbgemm_fp8": _fbgemm_fp8, "awq": _awq, "gptq": _gptq}.get(method)
    if parse is None:
        raise ConfigError(f"unsupported quantization format {method or '<no quant_method>'!r} in the checkpoint "
                          f"(supported: {', '.join(CHECKPOINT_METHODS)})")
    return parse(qc)


def _describe(args: dict | None) -> str:
    if not args:
        return "none"
    dynamic = "dynamic" if args.get("dynamic") else "static"
    symmetric = "" if args.get("symmetric", True) else ", asymmetric"
    return f"{args.get('type')}{args.get('num_bits')} per {args.get('strategy')} ({dynamic}{symmetric})"


def _compressed_tensors(qc: dict) -> QuantizationConfig:
    groups = list((qc.get("config_groups") or {}).values())
    if not groups:
        raise ConfigError("compressed-tensors quantization_config has no config_groups")
    configs = {_ct_group(group.get("format") or qc.get("format"), group.get("weights") or {},
                         group.get("input_activations")) for group in groups}
    if len(configs) > 1:
        raise ConfigError("compressed-tensors config_groups with different schemes in one model are not supported")
    return configs.pop()


def _ct_group(fmt: str | None, w: dict, a: dict | None) -> QuantizationConfig:
    """One config group's scheme (vLLM's CompressedTensors* scheme names in the comments)."""
    a = a or None
    wtype, bits, strategy, dynamic = w.get("type"), w.get("num_bits"), w.get("strategy"), a and a.get("dynamic")
    a_kind = a and (a.get("type"), a.get("num_bits"), a.get("strategy"), dynamic)
    config = None
    if fmt == "float-quantized" and (wtype, bits) == ("float", 8):
        if strategy in ("channel", "tensor") and a_kind in (("float", 8, "token", True), ("float", 8, "tensor", False)):
            config = QuantizationConfig("compressed-tensors", "fp8", static_input_scale=not dynamic)  # W8A8Fp8
        block = w.get("block_structure") or []
        if strategy == "block" and len(block) == 2 and (a is None or (a_kind[:2] == ("float", 8) and dynamic is True)):
            config = QuantizationConfig("compressed-tensors", "fp8_block", group_size=int(block[1]),
                                        block_n=int(block[0]))  # W8A8Fp8 with block scales
    elif fmt == "pack-quantized" and wtype == "int" and a is None and strategy in ("group", "channel"):
        group = int(w.get("group_size") or 0) if strategy == "group" else 0
        symmetric = w.get("symmetric", True) is not False
        if bits == 4:  # WNA16
            config = QuantizationConfig("compressed-tensors", "int4", group_size=group or -1, symmetric=symmetric)
        elif bits == 8 and symmetric:
            config = QuantizationConfig("compressed-tensors", "int8", group_size=group)
    elif (fmt == "int-quantized" and (wtype, bits, strategy) == ("int", 8, "channel") and w.get("symmetric", True)
          and a_kind == ("int", 8, "token", True) and a.get("symmetric", True)):
        config = QuantizationConfig("compressed-tensors", "int8_w8a8")  # W8A8Int8, dynamic per token
    if config is None:
        raise ConfigError(f"unsupported compressed-tensors scheme: format {fmt}, weights {_describe(w)}, "
                          f"activations {_describe(a)} (supported: {_CT_SUPPORTED})")
    return config


def _modelopt(qc: dict) -> QuantizationConfig:
    algo = (qc.get("quantization") or qc).get("quant_algo")
    if algo not in _MODELOPT_ALGOS:
        raise ConfigError(f"unsupported ModelOpt quant_algo {algo!r} (supported: {', '.join(_MODELOPT_ALGOS)})")
    return QuantizationConfig("modelopt", "fp8", static_input_scale=_MODELOPT_ALGOS[algo])


def _fp8(qc: dict) -> QuantizationConfig:
    scheme, block = qc.get("activation_scheme", "dynamic"), qc.get("weight_block_size")
    if scheme not in ("dynamic", "static") or (block and scheme != "dynamic"):
        raise ConfigError(f"unsupported fp8 activation_scheme {scheme!r} (dynamic or static; dynamic with "
                          "weight_block_size)")
    if block:
        if len(block) != 2:
            raise ConfigError(f"unsupported fp8 weight_block_size {block} (two sizes: output channels, input rows)")
        return QuantizationConfig("fp8", "fp8_block", group_size=int(block[1]), block_n=int(block[0]))
    return QuantizationConfig("fp8", "fp8", static_input_scale=scheme == "static")


def _fbgemm_fp8(qc: dict) -> QuantizationConfig:
    """FBGEMM fp8 (Meta's Llama 3.1 FP8 checkpoints): e4m3 weights per output channel,
    activations per token, each token's amax capped at `activation_scale_ub`."""
    ub = qc.get("activation_scale_ub")
    if ub is not None and not (isinstance(ub, (int, float)) and ub > 0):
        raise ConfigError(f"fbgemm_fp8 activation_scale_ub must be a positive number, got {ub!r}")
    return QuantizationConfig("fbgemm_fp8", "fp8", input_scale_ub=None if ub is None else float(ub))


def _awq(qc: dict) -> QuantizationConfig:
    bits, group = qc.get("bits", qc.get("w_bit")), qc.get("group_size", qc.get("q_group_size"))
    version, zero_point = str(qc.get("version", "gemm")).lower(), qc.get("zero_point", True)
    if bits != 4 or version != "gemm" or not zero_point:
        raise ConfigError(f"unsupported AWQ checkpoint: bits {bits}, version {version}, zero_point {zero_point} "
                          "(supported: 4 bits, GEMM layout, zero points)")
    return QuantizationConfig("awq", "int4", group_size=int(group))


def _gptq(qc: dict) -> QuantizationConfig:
    bits, fmt = qc.get("bits"), qc.get("checkpoint_format", "gptq")
    if bits not in (4, 8) or fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(f"unsupported GPTQ checkpoint: bits {bits}, checkpoint_format {fmt} "
                          "(supported: 4 or 8 bits, gptq or gptq_v2)")
    if bits == 8 and not qc.get("sym", True):
        raise ConfigError("unsupported GPTQ checkpoint: 8 bits, sym False (supported: 8 bits symmetric; 4 bits either)")
    return QuantizationConfig("gptq", "int4" if bits == 4 else "int8", group_size=int(qc.get("group_size", 128)),
                              zero_offset=1 if fmt == "gptq" else 0)
