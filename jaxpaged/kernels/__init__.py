"""Paged-attention kernels; every one has the signature of `paged_attention_ref`."""
from __future__ import annotations

from collections.abc import Callable

import jax

from jaxpaged.kernels.paged_attention import paged_attention_ref


def get_attention(backend: str = "auto") -> Callable:
    """`reference` (jnp, any backend) or `pallas` (GPU kernel); `auto` picks by platform."""
    if backend == "auto":
        backend = "reference"  # the Pallas GPU kernel becomes the GPU default once it lands
    if backend == "reference":
        return paged_attention_ref
    if jax.default_backend() != "gpu":
        raise ValueError("attention_backend 'pallas' needs a GPU; use 'reference' on this machine")
    from jaxpaged.kernels.paged_attention_gpu import paged_attention

    return paged_attention
