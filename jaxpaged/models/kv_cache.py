"""The paged KV pool: one stacked array for keys and one for values, allocated once."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxpaged.models.config import ModelConfig

SCRATCH_BLOCK = 0  # padding tokens write here; never handed to a sequence


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, Hkv, num_blocks, block_size, D]
    v: jax.Array  # [L, Hkv, num_blocks, block_size, D]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[2]

    @property
    def block_size(self) -> int:
        return self.k.shape[3]


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype) -> int:
    """Bytes of K and V for one block across all layers."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * block_size * cfg.head_dim * jnp.dtype(dtype).itemsize


def init_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype, sharding=None) -> KVCache:
    """Zero-initialised pool of `num_blocks` blocks (block 0 included, as scratch); with a
    `sharding` (tensor parallelism: over KV heads) each device holds its part."""
    shape = (cfg.num_layers, cfg.num_kv_heads, num_blocks, block_size, cfg.head_dim)
    where = sharding or jax.devices()[0]  # committed, like the step's outputs: one compile per shape
    return KVCache(jnp.zeros(shape, dtype, device=where), jnp.zeros(shape, dtype, device=where))
