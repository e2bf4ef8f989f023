"""How quantized values are laid out: int4 packed 8 to an int32 word along the input axis (GPTQ's
order: row 8i + j in bits 4j..4j+3 of word i), and act-order's input rows sorted by group."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.models.config import ConfigError

INT4_PER_WORD = 8  # int4 values packed into one int32 word along the input axis


def group_order(g_idx, groups: int) -> np.ndarray:
    """int32 [in]: the input rows sorted by their group (`g_idx` [in]: row i's group), for an
    act-order weight stored with consecutive groups; each group must have `in / groups` rows,
    as GPTQ makes them."""
    g_idx = np.asarray(g_idx)
    counts = np.bincount(g_idx, minlength=groups)
    if not (counts == len(g_idx) // groups).all():
        raise ConfigError(f"act-order g_idx with groups of unequal sizes ({counts.min()} to {counts.max()} "
                          "rows) is not supported")
    return np.argsort(g_idx, kind="stable").astype(np.int32)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """int32 `[n / 8, *out]` -> int32 values 0..15 `[n, *out]` (`Int4Weight`'s packing)."""
    shifts = (4 * jnp.arange(INT4_PER_WORD, dtype=jnp.int32)).reshape(1, INT4_PER_WORD, *(1,) * (packed.ndim - 1))
    values = (packed[:, None] >> shifts) & 0xF
    return values.reshape(packed.shape[0] * INT4_PER_WORD, *packed.shape[1:])


def pack_int4(values: jax.Array) -> jax.Array:
    """Values 0..15 `[n, *out]` (n a multiple of 8) -> int32 `[n / 8, *out]`, the inverse of `unpack_int4`."""
    v = jnp.asarray(values).astype(jnp.uint32).reshape(-1, INT4_PER_WORD, *values.shape[1:])
    shifts = (4 * jnp.arange(INT4_PER_WORD, dtype=jnp.uint32)).reshape(1, INT4_PER_WORD, *(1,) * (values.ndim - 1))
    return jax.lax.bitcast_convert_type(jnp.sum(v << shifts, axis=1, dtype=jnp.uint32), jnp.int32)
