"""Paged-attention kernels; every one has the signature of `paged_attention_ref`."""
from __future__ import annotations

from collections.abc import Callable

import jax

from jaxpaged.kernels.paged_attention import paged_attention_ref


def get_attention(backend: str = "auto") -> Callable:
    """`reference` (jnp), `cpu` (jnp, its cost following the real context), `pallas` (the
    Pallas GPU kernel; Pallas interpret mode off-GPU, slow, for tests) or `mosaic` (Hopper:
    prefill rows on the Mosaic GPU kernel, decode rows on the Pallas one); `auto` is the Pallas
    kernel on a GPU and `cpu` elsewhere."""
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
