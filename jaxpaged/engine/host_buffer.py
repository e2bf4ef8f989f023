"""One host-to-device transfer per program call: the step's small host arrays packed into a
single int32 buffer, unpacked inside the jitted program by a static layout.

Passing ~16 numpy arrays to a jitted call costs one transfer each (milliseconds per step on
the GPU); one packed buffer costs one. All fields are 4-byte (int32, uint32, float32) or
bool (stored as int32). Each field starts at a multiple of 256 bytes (`ALIGN` int32s):
XLA may hand a kernel a field's slice of the buffer without a copy, and a Mosaic GPU kernel
refuses an operand that is not 256-byte aligned.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Layout = tuple[tuple[str, tuple[int, ...], str], ...]  # (name, shape, dtype) per field, in order
# dtype names by dtype: numpy's `dtype.name` is a Python property (~2 us; a step packs ~36 fields)
_NAMES = {np.dtype(t): t for t in ("int32", "uint32", "float32", "bool")}
ALIGN = 64  # int32s: 256 bytes
_PAD = np.zeros(ALIGN, np.int32)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def pack(fields: dict[str, np.ndarray]) -> tuple[np.ndarray, Layout]:
    """Lay `fields` out in one flat int32 array, each at a multiple of `ALIGN`; the layout is
    hashable (a static arg)."""
    layout, parts = [], []
    for name, a in fields.items():
        a = np.asarray(a)
        layout.append((name, a.shape, _NAMES.get(a.dtype) or a.dtype.name))
        flat = a.astype(np.int32) if a.dtype == np.bool_ else a
        assert flat.dtype.itemsize == 4, f"{name}: {a.dtype} is not a 4-byte type"
        parts.append(flat := np.ascontiguousarray(flat).reshape(-1).view(np.int32))
        if pad := _aligned(flat.size) - flat.size:
            parts.append(_PAD[:pad])
    return np.concatenate(parts) if parts else np.zeros(0, np.int32), tuple(layout)


def field_shape(layout: Layout, name: str) -> tuple[int, ...] | None:
    """The shape of field `name` in a packed layout (None if it has no such field)."""
    return next((shape for field, shape, _ in layout if field == name), None)


def _spans(layout: Layout):
    """(name, shape, dtype, start, stop) of each field in a packed buffer."""
    offset = 0
    for name, shape, dtype in layout:
        n = int(np.prod(shape, dtype=np.int64))
        yield name, shape, dtype, offset, offset + n
        offset += _aligned(n)


def field_view(buf: np.ndarray, layout: Layout, name: str) -> np.ndarray:
    """Field `name` of a packed host buffer as a writable numpy view (4-byte fields)."""
    for field, shape, dtype, start, stop in _spans(layout):
        if field == name:
            assert dtype != "bool", f"{name}: a bool field is stored as int32"
            return buf[start:stop].view(np.dtype(dtype)).reshape(shape)
    raise KeyError(name)


def unpack(buf: jax.Array, layout: Layout) -> dict[str, jax.Array]:
    """The fields of a `pack`ed buffer (inside jit: static slices and bitcasts, no copies)."""
    out = {}
    for name, shape, dtype, start, stop in _spans(layout):
        flat = buf[start:stop]
        if dtype == "bool":
            flat = flat != 0
        elif dtype != "int32":
            flat = jax.lax.bitcast_convert_type(flat, jnp.dtype(dtype))
        out[name] = flat.reshape(shape)
    return out
