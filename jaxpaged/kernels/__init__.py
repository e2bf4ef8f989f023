"""Paged-attention kernels; every one has the signature of `paged_attention_ref`."""
from __future__ import annotations

from collections.abc import Callable

import jax

from jaxpaged.kernels.paged_attention import paged_attention_ref


def get_attention(backend: str = "auto") -> Callable:
    """`reference` (jnp) or `pallas` (the Pallas GPU kernel; Pallas interpret mode off-GPU,
    slow, for tests); `auto` is the kernel on a GPU and the reference elsewhere."""
    if backend == "auto":
        backend = "pallas" if jax.default_backend() == "gpu" else "reference"
    if backend == "reference":
        return paged_attention_ref
    from jaxpaged.kernels.paged_attention_gpu import paged_attention_gpu

    return paged_attention_gpu
