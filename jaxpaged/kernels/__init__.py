"""Paged-attention kernels; every one has the signature of `paged_attention_ref`."""
from __future__ import annotations

from collections.abc import Callable

import jax

from jaxpaged.kernels.paged_attention import paged_attention_ref


def on_one_hopper_gpu() -> bool:
    """One sm_90 GPU: wgmma is Hopper's, and the Mosaic route is measured on one GPU only."""
    return (jax.default_backend() == "gpu" and jax.device_count() == 1
            and getattr(jax.devices()[0], "compute_capability", "") == "9.0")


def get_attention(backend: str = "auto") -> Callable:
    """`reference` (jnp), `cpu` (jnp, its cost following the real context), `pallas` (the
    Pallas GPU kernel; Pallas interpret mode off-GPU, slow, for tests) or `mosaic` (Hopper:
    prefill rows on the Mosaic GPU kernel, decode rows on the Pallas one); `auto` is the mosaic
    route on one Hopper GPU where it applies (bf16/fp16 pools; else the Pallas kernel), the
    Pallas kernel on other GPUs and `cpu` elsewhere."""
    if backend == "auto" and on_one_hopper_gpu():
        from jaxpaged.kernels.paged_attention_mosaic import paged_attention_hopper

        return paged_attention_hopper
    if backend == "auto":
        backend = "pallas" if jax.default_backend() == "gpu" else "cpu"
    if backend == "reference":
        return paged_attention_ref
    if backend == "cpu":
        from jaxpaged.kernels.paged_attention_cpu import paged_attention_cpu

        return paged_attention_cpu
    if backend == "mosaic":
        from jaxpaged.kernels.paged_attention_mosaic import paged_attention_mosaic

        return paged_attention_mosaic
    from jaxpaged.kernels.paged_attention_gpu import paged_attention_gpu

    return paged_attention_gpu
