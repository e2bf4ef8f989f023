"""The packed host-to-device buffer: every field comes back bit-exact inside jit."""
import jax
import numpy as np

from jaxpaged.engine.host_buffer import field_view, pack, unpack


def test_pack_unpack_round_trip_in_jit():
    rng = np.random.default_rng(0)
    fields = {
        "ids": rng.integers(-5, 1 << 30, (7,), dtype=np.int32),
        "vals": np.array([[1.5, -np.inf], [np.nan, 3e-38]], np.float32),
        "keys": rng.integers(0, 1 << 32, (3, 2), dtype=np.uint32),
        "mask": np.array([[True, False, True]]),
        "empty": np.zeros((0, 4), np.int32),
    }
    buf, layout = pack(fields)
    assert buf.dtype == np.int32 and buf.ndim == 1
    out = jax.jit(unpack, static_argnums=1)(buf, layout)
    assert set(out) == set(fields)
    for name, want in fields.items():
        got = np.asarray(out[name])
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), name  # bit-exact, NaN and -inf included
        if name != "mask":  # each field 256-byte aligned in the buffer, as a Mosaic GPU operand must be
            assert (field_view(buf, layout, name).ctypes.data - buf.ctypes.data) % 256 == 0, name
