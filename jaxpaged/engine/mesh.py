"""The device mesh of a tensor-parallel engine: one axis `tp` over the first devices (of every
process, after `init_distributed`). The weights and the KV pool are laid out on it as
`models/sharding.py` says and XLA partitions the matmuls (inserting the all-reduces of the
row-parallel ones); the attention kernel runs per device inside `shard_map`, since a Pallas
call has no partitioning rule."""
from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxpaged.models.sharding import KV_POOL

HEADS = P(None, "tp", None)  # q / attention output [T, H, D]


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


def shard_attention(attention: Callable, mesh: Mesh) -> Callable:
    """Run a paged-attention kernel per device on its KV heads (same signature)."""

    def sharded(q, k_pool, v_pool, layer, query_start, seq_lens, block_tables, *, scale, sliding_window=0,
                max_query_len=None, k_scale=None, v_scale=None):
        def local(q, k_pool, v_pool, query_start, seq_lens, block_tables, k_scale, v_scale):
            return attention(q, k_pool, v_pool, layer, query_start, seq_lens, block_tables, scale=scale,
                             sliding_window=sliding_window, max_query_len=max_query_len, k_scale=k_scale,
                             v_scale=v_scale)

        # an fp8 pool's scales [L, Hkv] split over the KV heads as the pool
        return jax.shard_map(local, mesh=mesh, in_specs=(HEADS, KV_POOL, KV_POOL, P(), P(), P(), KV_POOL, KV_POOL),
                             out_specs=HEADS, check_vma=False)(q, k_pool, v_pool, query_start, seq_lens,
                                                               block_tables, k_scale, v_scale)

    return sharded
