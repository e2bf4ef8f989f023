"""The paged KV pool: one stacked array for keys and one for values, allocated once, in the
model's dtype or vLLM's `kv_cache_dtype`; for an fp8 pool, the dequantization scales beside them."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxpaged.models.config import ModelConfig

SCRATCH_BLOCK = 0  # padding tokens write here; never handed to a sequence
# vLLM's `kv_cache_dtype` values besides auto and the pool dtype each one means (fp8 is e4m3, as on CUDA)
KV_CACHE_DTYPES = {"bfloat16": jnp.bfloat16, "fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn,
                   "fp8_e5m2": jnp.float8_e5m2}


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, Hkv, num_blocks, block_size, D]
    v: jax.Array  # [L, Hkv, num_blocks, block_size, D]
    # an fp8 pool stores value / scale: float32 [L, Hkv] (None: values stored as they are)
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @property
    def num_blocks(self) -> int:
        return self.k.shape[2]

    @property
    def block_size(self) -> int:
        return self.k.shape[3]


def kv_cache_dtype(name: str, model_dtype) -> jnp.dtype:
    """The pool dtype of vLLM's `kv_cache_dtype` value (`auto`: the model's)."""
    if name == "auto":
        return jnp.dtype(model_dtype)
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {name!r} is not supported (auto, {', '.join(KV_CACHE_DTYPES)})")
    return jnp.dtype(KV_CACHE_DTYPES[name])


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype) -> int:
    """Bytes of K and V for one block across all layers."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * block_size * cfg.head_dim * jnp.dtype(dtype).itemsize


def init_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype, sharding=None,
                  k_scale: np.ndarray | None = None, v_scale: np.ndarray | None = None) -> KVCache:
    """Zero-initialised pool of `num_blocks` blocks (block 0 included, as scratch); with a
    `sharding` (tensor parallelism: over KV heads) each device holds its part. An fp8 `dtype`
    takes scales [L, Hkv] (default ones), sharded over the KV heads as the pool."""
    shape = (cfg.num_layers, cfg.num_kv_heads, num_blocks, block_size, cfg.head_dim)
    where = sharding or jax.devices()[0]  # committed, like the step's outputs: one compile per shape
    kv = KVCache(jnp.zeros(shape, dtype, device=where), jnp.zeros(shape, dtype, device=where))
    if jnp.dtype(dtype).itemsize != 1:
        return kv
    def put(scale: np.ndarray | None) -> jax.Array:
        scale = np.ones(shape[:2], np.float32) if scale is None else np.asarray(scale, np.float32)
        if sharding is None:
            return jax.device_put(scale, where)
        return jax.make_array_from_callback(scale.shape, sharding, scale.__getitem__)  # any process's devices

    return kv.replace(k_scale=put(k_scale), v_scale=put(v_scale))
