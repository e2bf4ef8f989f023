"""Tensor parallelism: one mesh axis `tp`; shardings declared per param by each model family.

Weights are column- or row-parallel (`models/<family>.partition_specs`), the KV pool is
sharded over KV heads, and the attention kernel runs per device inside `shard_map` (a
Pallas call has no partitioning rule); XLA inserts the all-reduces of the row-parallel
matmuls.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpaged.models import ConfigError, ModelConfig, build_params, family_module

HEADS = P(None, "tp", None)  # q / attention output [T, H, D]
KV_POOL = P(None, "tp")  # [L, Hkv, num_blocks, block_size, D]


def init_distributed(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Join a multi-process JAX runtime (several hosts, or processes on one) before any JAX
    work: `jax.devices()` then lists every process's devices and the `tp` mesh spans them.
    Every process must run the same requests in the same order (SPMD)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU meshes across processes
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)


def make_mesh(tp: int) -> Mesh:
    if tp > len(jax.devices()):
        raise ValueError(f"tensor_parallel_size {tp} needs {tp} devices, found {len(jax.devices())}")
    # Auto axes: XLA partitions the matmuls from the weights' shardings (GSPMD)
    return jax.make_mesh((tp,), ("tp",), devices=jax.devices()[:tp], axis_types=(jax.sharding.AxisType.Auto,))


def split_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """`cfg` as run `tp` ways; a one-line error when the model cannot be split so.

    With fewer KV heads than devices, each KV head is replicated `tp // Hkv` times (as vLLM
    does) and its query heads are split among the copies, so every device holds one KV head.
    """
    for what, n in [("attention heads", cfg.num_heads), ("intermediate size", cfg.intermediate_size)]:
        if n % tp:
            raise ConfigError(f"tensor_parallel_size {tp} does not divide the model's {n} {what}")
    hkv = cfg.num_kv_heads
    if hkv % tp == 0:
        return cfg
    if tp % hkv:
        raise ConfigError(f"tensor_parallel_size {tp} neither divides nor is a multiple of the model's {hkv} KV heads")
    return dataclasses.replace(cfg, num_kv_heads=tp, kv_head_replicas=tp // hkv)


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict:
    """A pytree parallel to the params: the NamedSharding of every weight."""
    return build_params(cfg, placement(cfg, mesh))


def placement(cfg: ModelConfig, mesh: Mesh) -> Callable[[str, tuple[int, ...], int | None], NamedSharding]:
    """`(key, shape, layer) -> NamedSharding` of one weight (the leaf function of `param_shardings`)."""
    specs = family_module(cfg).partition_specs(cfg)
    tp = mesh.shape["tp"]

    def sharding(key: str, shape: tuple[int, ...], layer: int | None) -> NamedSharding:
        spec = specs[key]
        if any(ax == "tp" and shape[i] % tp for i, ax in enumerate(spec)):
            spec = P()  # e.g. a vocabulary the mesh does not divide: keep it whole
        return NamedSharding(mesh, spec)

    return sharding


def shard_attention(attention: Callable, mesh: Mesh) -> Callable:
    """Run a paged-attention kernel per device on its KV heads (same signature)."""

    def sharded(q, k_pool, v_pool, layer, query_start, seq_lens, block_tables, *, scale, sliding_window=0,
                max_query_len=None):
        def local(q, k_pool, v_pool, query_start, seq_lens, block_tables):
            return attention(q, k_pool, v_pool, layer, query_start, seq_lens, block_tables,
                             scale=scale, sliding_window=sliding_window, max_query_len=max_query_len)

        return jax.shard_map(local, mesh=mesh, in_specs=(HEADS, KV_POOL, KV_POOL, P(), P(), P()),
                             out_specs=HEADS, check_vma=False)(q, k_pool, v_pool, query_start, seq_lens,
                                                               block_tables)

    return sharded
