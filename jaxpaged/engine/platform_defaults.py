"""The engine sizes a user leaves unset, per platform (vLLM's `EngineArgs._set_default_args`,
whose CPU platform picks smaller ones too). The GPU sizes fill a device; on a CPU every
compiled step size costs seconds of start-up and a padded step of 2048 tokens seconds of
compute, so there the context, seats, token budget and step sizes are small. An explicit
value (any that is not None) always wins."""
from __future__ import annotations

import dataclasses
import logging

import jax

from jaxpaged.engine.buckets import token_buckets
from jaxpaged.engine.config import EngineConfig

logger = logging.getLogger("jaxpaged")


@dataclasses.dataclass(frozen=True)
class PlatformDefaults:
    max_model_len: int | None  # cap on the model's max_position_embeddings (None: the model's)
    max_num_seqs: int
    max_num_batched_tokens: int
    # token buckets: `buckets.token_buckets`' rule with powers of `bucket_factor` (None: the
    # engine applies the rule itself, powers of two)
    bucket_factor: int | None


GPU_DEFAULTS = PlatformDefaults(max_model_len=None, max_num_seqs=256, max_num_batched_tokens=2048,
                                bucket_factor=None)
# As the demo server's sizes (16, 64 and 256-token steps): 3 forwards and 3 x 8 heads to compile.
CPU_DEFAULTS = PlatformDefaults(max_model_len=4096, max_num_seqs=16, max_num_batched_tokens=256, bucket_factor=4)


def set_default_args(config: EngineConfig, max_position_embeddings: int) -> EngineConfig:
    """`config` with its unset sizes filled for JAX's default backend (`--device` sets it);
    the CPU sizes it applies are logged."""
    d = CPU_DEFAULTS if jax.default_backend() == "cpu" else GPU_DEFAULTS
    filled = {}
    if config.max_model_len is None:
        filled["max_model_len"] = min(max_position_embeddings, d.max_model_len or max_position_embeddings)
    if config.max_num_seqs is None:
        filled["max_num_seqs"] = d.max_num_seqs
    if config.max_num_batched_tokens is None:
        filled["max_num_batched_tokens"] = d.max_num_batched_tokens
    if config.token_buckets is None and d.bucket_factor is not None:
        budget = filled.get("max_num_batched_tokens", config.max_num_batched_tokens)
        seats = filled.get("max_num_seqs", config.max_num_seqs)
        filled["token_buckets"] = tuple(token_buckets(budget, seats, factor=d.bucket_factor))
    if d is CPU_DEFAULTS and filled:
        kv = "" if config.num_kv_blocks else f", KV cache at most cpu_kv_cache_bytes={config.cpu_kv_cache_bytes}"
        logger.info("CPU defaults: %s%s (the model allows max_model_len %d; set any of them to override)",
                    ", ".join(f"{k}={v}" for k, v in filled.items()), kv, max_position_embeddings)
    return dataclasses.replace(config, **filled)
