"""Model architecture from a Hugging Face `config.json`.

`ModelConfig` is frozen and hashable so a jitted forward can close over it as a static value.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

# HF `architectures[0]` -> our model family.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "GraniteForCausalLM": "llama",
    "OPTForCausalLM": "opt",
}
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class ConfigError(ValueError):
    """An HF model directory or config.json we cannot serve; the message is one line."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str  # HF class name, e.g. "LlamaForCausalLM"
    family: str  # "llama" or "opt"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # as run: the checkpoint's, times kv_head_replicas
    head_dim: int
    max_position_embeddings: int
    dtype: str  # checkpoint dtype (numpy name)
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2, Llama attention_bias, OPT
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3
    kv_head_replicas: int = 1  # >1 when tensor parallelism has more devices than KV heads
    # Per-layer sliding window in tokens (0 = full attention).
    sliding_windows: tuple[int, ...] = ()
    # RoPE (llama family): inverse frequencies are derived from these.
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted items of rope parameters
    # Granite multipliers (1.0 elsewhere); attention_multiplier None = 1/sqrt(head_dim).
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    # OPT
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def attn_scale(self) -> float:
        if self.attention_multiplier is not None:
            return self.attention_multiplier
        return 1.0 / math.sqrt(self.head_dim)

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse RoPE frequencies, [head_dim // 2] float32 (default, linear or llama3 scaling)."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        p = dict(self.rope_scaling)
        kind = p.get("rope_type", "default")
        if kind == "linear":
            inv = inv / p["factor"]
        elif kind == "llama3":
            factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
            old = p["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > old / lo, inv / factor, inv)
            smooth = (old / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old / hi) & (wavelen <= old / lo)
            inv = np.where(medium, smoothed, scaled)
        return inv.astype(np.float32)


def _rope(hf: dict) -> tuple[float, tuple]:
    """RoPE theta and scaling from either the transformers-5 `rope_parameters` or the older keys."""
    params = dict(hf.get("rope_parameters") or {})
    if not params:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear", "llama3"):
        raise ConfigError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")
    theta = float(params.pop("rope_theta", 10000.0))
    if kind == "default":
        return theta, ()
    return theta, tuple(sorted((k, v) for k, v in params.items() if not isinstance(v, (list, dict))))


def _sliding_windows(hf: dict, num_layers: int) -> tuple[int, ...]:
    window = hf.get("sliding_window") or 0
    if "layer_types" in hf and hf["layer_types"]:
        return tuple(window if t == "sliding_attention" else 0 for t in hf["layer_types"])
    if hf.get("use_sliding_window") is False:  # Qwen2/3 carry a window they do not use
        return (0,) * num_layers
    return (int(window),) * num_layers


def _eos_ids(hf: dict) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def config_from_hf(hf: dict) -> ModelConfig:
    """Map an HF config dict to a `ModelConfig`; raises `ConfigError` for what we cannot run."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else f"<none> (model_type={hf.get('model_type')!r})"
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unsupported architecture {arch}; supported: {', '.join(ARCHITECTURES)}")
    family = ARCHITECTURES[arch]
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").removeprefix("torch.")
    if dtype not in DTYPES:
        raise ConfigError(f"unsupported checkpoint dtype {dtype!r}")
    common = dict(
        architecture=arch,
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        dtype=dtype,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", family == "opt")),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
    )
    if family == "opt":
        if hf.get("activation_function", "relu") != "relu":
            raise ConfigError(f"unsupported activation_function {hf['activation_function']!r} for {arch} (only relu)")
        return ModelConfig(
            **common,
            intermediate_size=hf["ffn_dim"],
            num_kv_heads=hf["num_attention_heads"],
            head_dim=hf["hidden_size"] // hf["num_attention_heads"],
            norm_eps=1e-5,
            qkv_bias=hf.get("enable_bias", True),
            o_bias=hf.get("enable_bias", True),
            mlp_bias=hf.get("enable_bias", True),
            sliding_windows=(0,) * hf["num_hidden_layers"],
            do_layer_norm_before=hf.get("do_layer_norm_before", True),
            word_embed_proj_dim=hf.get("word_embed_proj_dim") or hf["hidden_size"],
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"unsupported hidden_act {hf.get('hidden_act')!r} for {arch} (only silu)")
    theta, scaling = _rope(hf)
    qwen2 = arch == "Qwen2ForCausalLM"
    granite = arch == "GraniteForCausalLM"
    return ModelConfig(
        **common,
        intermediate_size=hf["intermediate_size"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=qwen2 or bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)) and not qwen2,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        sliding_windows=_sliding_windows(hf, hf["num_hidden_layers"]),
        rope_theta=theta,
        rope_scaling=scaling,
        embedding_multiplier=hf.get("embedding_multiplier", 1.0) if granite else 1.0,
        residual_multiplier=hf.get("residual_multiplier", 1.0) if granite else 1.0,
        attention_multiplier=hf.get("attention_multiplier") if granite else None,
        logits_scaling=hf.get("logits_scaling", 1.0) if granite else 1.0,
    )


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read `model_dir/config.json`; one-line `ConfigError` if missing or unsupported."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ConfigError(f"model directory not found: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"no config.json in model directory {path}")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from None
    return config_from_hf(hf)
