"""Tensor-parallel layout of the model's arrays over one mesh axis `tp`: each weight as its
family's `partition_specs` say (q/k/v and gate/up column-parallel, o/down row-parallel), the KV
pool over KV heads, the config of a model split `tp` ways, and the layouts the int4 kernel
reads."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpaged.models.config import ConfigError, ModelConfig
from jaxpaged.models.family import family_module, param_specs
from jaxpaged.models.quantization import Int4Weight, QuantizedWeight, leaf_specs

KV_POOL = P(None, "tp")  # [L, Hkv, num_blocks, block_size, D]


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


def _divides(spec: P, shape: tuple[int, ...], tp: int) -> bool:
    """Whether `tp` devices split every axis of `shape` that `spec` shards."""
    return not any(ax == "tp" and shape[i] % tp for i, ax in enumerate(spec))


def placement(cfg: ModelConfig, mesh: Mesh) -> Callable[[str, Any, int | None], Any]:
    """`(key, value, layer) -> sharding` of one weight on `mesh`: for an array (or its
    ShapeDtypeStruct) the NamedSharding of its spec in `partition_specs`, for a quantized leaf a
    leaf of them (each field's spec follows the dense one: `QuantizedWeight.partition_specs`);
    replicated where the mesh does not divide a sharded axis. A leaf function for
    `build_params`, so the loader places each weight as it makes it."""
    specs = family_module(cfg).partition_specs(cfg)
    tp = mesh.shape["tp"]

    def named(spec: P, array) -> NamedSharding:
        if not _divides(spec, array.shape, tp):
            spec = P()  # e.g. a vocabulary the mesh does not divide: keep it whole
        return NamedSharding(mesh, spec)

    def sharding(key: str, value, layer: int | None):
        return jax.tree.map(named, leaf_specs(value, specs[key]), value)

    return sharding


def with_kernel_layouts(params: dict, cfg: ModelConfig, mesh: Mesh) -> dict:
    """`params` with each int4 leaf's `layout` set to its dense weight's NamedSharding where the
    mesh splits every field alike (the int4 GPU kernel then runs per device inside shard_map);
    elsewhere (a field kept whole) XLA dequantizes and partitions the dot."""
    tp = mesh.shape["tp"]

    def attach(value, spec: P):
        if not isinstance(value, Int4Weight):
            return value
        if not all(_divides(spec, f.shape, tp) for f in (value.qweight, value.scales, value.zeros)):
            return value
        return dataclasses.replace(value, layout=NamedSharding(mesh, spec))

    return jax.tree.map(attach, params, param_specs(cfg), is_leaf=lambda v: isinstance(v, QuantizedWeight))
