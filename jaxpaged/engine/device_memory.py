"""How much device memory the KV pool may take: XLA's allocator statistics, or, where the
allocator keeps none (XLA's VMM allocator, which the command-buffer update mode SKIP_TEMP
uses), the CUDA driver's free and total memory (what vLLM reads with torch.cuda.mem_get_info),
capped like XLA's allocators at XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of the total.
The driver is called through ctypes: libcuda ships with every NVIDIA driver, so no package is
needed."""
from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from jaxpaged.engine.config import EngineConfig
    from jaxpaged.models.config import ModelConfig


class MemoryBudget(NamedTuple):
    limit: int  # bytes the allocator may take on the device
    in_use: int  # bytes taken now


def memory_budget(device) -> MemoryBudget | None:
    """The allocator's limit and use on `device`; None where no source answers (e.g. the CPU)."""
    stats = device.memory_stats()
    if stats and "bytes_limit" in stats:
        return MemoryBudget(stats["bytes_limit"], stats["bytes_in_use"])
    if device.platform == "gpu":
        try:
            free, total = cuda_mem_get_info(device.local_hardware_id)
        except OSError:
            return None
        # XLA's VMM allocator refuses physical memory beyond this fraction (its "PA budget")
        return MemoryBudget(int(total * float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", 0.75))), total - free)
    return None


def cuda_mem_get_info(ordinal: int) -> tuple[int, int]:
    """(free, total) bytes of CUDA device `ordinal` (in CUDA_VISIBLE_DEVICES numbering), read in
    its primary context, the one XLA uses. Raises OSError without a driver or on a CUDA error."""
    cuda = ctypes.CDLL("libcuda.so.1")

    def check(status: int) -> None:
        if status != 0:
            raise OSError(f"CUDA driver error {status}")

    dev, ctx, popped = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    check(cuda.cuInit(0))
    check(cuda.cuDeviceGet(ctypes.byref(dev), ordinal))
    check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
    try:
        check(cuda.cuCtxPushCurrent_v2(ctx))
        try:
            check(cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)))
        finally:
            cuda.cuCtxPopCurrent_v2(ctypes.byref(popped))
    finally:
        cuda.cuDevicePrimaryCtxRelease_v2(dev)
    return free.value, total.value


def kv_pool_blocks(config: EngineConfig, cfg: ModelConfig, max_model_len: int, max_num_batched_tokens: int,
                   dtype, head_bytes: int, draft: ModelConfig | None = None) -> int:
    """KV pool size in blocks from `gpu_memory_utilization` of device memory, or on a CPU the
    seats' full contexts capped at `cpu_kv_cache_bytes`. `head_bytes`: the head programs'
    measured need beyond their arguments (per device). `draft`: a draft model whose KV pool
    has as many blocks (speculative decoding), counted in each block's bytes."""
    import jax

    from jaxpaged.models.kv_cache import kv_bytes_per_block

    # bytes per block on each device (tensor parallelism splits the KV heads)
    per_block = kv_bytes_per_block(cfg, config.block_size, dtype)
    if draft is not None:  # sharded as the target's
        per_block += kv_bytes_per_block(draft, config.block_size, dtype)
    per_block //= config.tensor_parallel_size
    budget = memory_budget(jax.local_devices()[0])
    if budget is not None:
        # Keep room for the step's temporaries: the heads' as measured, the forward's
        # activations (f32 upper bound of hidden and MLP widths per token) estimated.
        reserve = head_bytes + max_num_batched_tokens * (8 * cfg.hidden_size + 4 * cfg.intermediate_size) * 4
        free = budget.limit * config.gpu_memory_utilization - budget.in_use - reserve
    elif jax.default_backend() != "cpu":
        raise ValueError(f"the {jax.default_backend()} device reports no memory budget to size the KV "
                         "cache from: set num_kv_blocks (--num-kv-blocks)")
    else:
        seats = config.max_num_seqs * -(-max_model_len // config.block_size) + 1  # + the scratch block
        free = min(config.cpu_kv_cache_bytes, seats * per_block)
    num = int(free // per_block)
    needed = -(-max_model_len // config.block_size) + 1
    if num < needed:
        raise ValueError(f"KV cache of {num} blocks cannot hold one sequence of max_model_len "
                         f"{max_model_len} ({needed} blocks); lower max_model_len or raise memory")
    return num
