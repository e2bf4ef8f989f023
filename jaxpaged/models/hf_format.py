"""Conventions of HF checkpoints that every model family shares."""
from __future__ import annotations

from jaxpaged.models.quantization.weights import QuantizedWeight

EMBEDDINGS = ("embed", "pos_embed")  # stored [rows, dim] by HF as by us


def hf_transpose(key: str, t):
    """HF stores linear weights `[out, in]`, we store `[in, out]`: transpose 2-D non-embedding
    tensors (the same call converts both ways). A quantized leaf is read in our layout already."""
    if isinstance(t, QuantizedWeight):
        return t
    return t.T if t.ndim == 2 and key.rsplit("/", 1)[-1] not in EMBEDDINGS else t
