"""An fp8 KV cache's dequantization scales from the checkpoint, under the names vLLM reads:
`...layers.{i}.self_attn.k_scale` / `v_scale` (compressed-tensors' `kv_cache_scheme`),
`...self_attn.k_proj.k_scale` / `v_proj.v_scale` (ModelOpt), `...self_attn.qkv_proj.k_scale`,
and the deprecated single `...self_attn.kv_scale` (used for both). Per tensor (`[]`, `[1]`) or
per KV head (`[Hkv]`). As in vLLM, a layer without them gets 1.0 (with a warning for e4m3), a
layer with one of the two uses the larger for both, and `kv_cache_dtype="auto"` reads none (engine/core.py)."""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
from safetensors import safe_open

from jaxpaged.models.config import ConfigError, ModelConfig
from jaxpaged.models.loader import tensor_files

logger = logging.getLogger("jaxpaged")
_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(?:(?:k_proj|v_proj|qkv_proj)\.)?(k|v|kv)_scale$")


@dataclasses.dataclass(frozen=True)
class KVCacheScales:
    """Dequantization scales of an fp8 pool: stored = value / scale."""
    k: np.ndarray  # float32 [L, Hkv]
    v: np.ndarray  # float32 [L, Hkv]
    from_checkpoint: bool  # False: vLLM's default 1.0 everywhere


def load_kv_scales(model_dir: str | Path | None, cfg: ModelConfig) -> KVCacheScales:
    """The scales of `cfg`'s layers and KV heads (after tensor-parallel head replication,
    `cfg.kv_head_replicas`) in the checkpoint in `model_dir` (None: random weights, ones)."""
    found: dict[tuple[int, str], np.ndarray] = {}
    for name, f in (tensor_files(Path(model_dir)) if model_dir is not None else {}).items():
        if (m := _NAME.search(name)) is not None:
            with safe_open(f, framework="flax") as st:
                found[int(m[1]), m[2]] = _per_head(name, np.asarray(st.get_tensor(name), np.float32), cfg)
    ones = np.ones(cfg.num_kv_heads, np.float32)
    k, v = [], []
    for layer in range(cfg.num_layers):
        ks, vs = found.get((layer, "k")), found.get((layer, "v"))
        if (both := found.get((layer, "kv"))) is not None or (ks is None) != (vs is None):
            ks = vs = np.maximum.reduce([s for s in (ks, vs, both) if s is not None])
        k.append(ones if ks is None else ks)
        v.append(ones if vs is None else vs)
    return KVCacheScales(np.stack(k), np.stack(v), bool(found))


def pool_scales(model_dir: str | Path | None, cfg: ModelConfig, dtype) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(k_scale, v_scale) [L, Hkv] of a pool of `dtype`: an fp8 pool's from the checkpoint
    (1.0 where it has none, warned for e4m3 as vLLM does); (None, None) for other pools."""
    if np.dtype(dtype).itemsize != 1:
        return None, None
    scales = load_kv_scales(model_dir, cfg)
    if not scales.from_checkpoint and np.dtype(dtype).name == "float8_e4m3fn":
        logger.warning("fp8 KV cache with scaling factor 1.0: the checkpoint has no k_scale / v_scale tensors "
                       "(accuracy may suffer)")
    return scales.k, scales.v


def _per_head(name: str, scale: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """A checkpoint scale as [Hkv] over `cfg`'s (possibly replicated) KV heads."""
    heads = cfg.num_kv_heads // cfg.kv_head_replicas
    if scale.size not in (1, heads):
        raise ConfigError(f"tensor {name} has shape {scale.shape}: expected one KV-cache scale per tensor or per "
                          f"KV head ({heads})")
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise ConfigError(f"tensor {name} holds a KV-cache scale that is not positive and finite: {scale.reshape(-1)}")
    return np.repeat(np.broadcast_to(scale.reshape(-1), (heads,)), cfg.kv_head_replicas)
