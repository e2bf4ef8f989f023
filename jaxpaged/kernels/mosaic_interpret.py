"""What the Mosaic GPU kernels need to also run in jax's GPU interpret mode (CPU tests): its
parameters, and register layouts that the interpreter, which has none, skips."""
from __future__ import annotations

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu


def interpret_params():
    """`plgpu.kernel`'s `interpret` value for the CPU (not exported by jax 0.10-0.11)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def layout_cast(x: jax.Array, layout, interpret: bool) -> jax.Array:
    """`plgpu.layout_cast` on the GPU; x itself in interpret mode."""
    return x if interpret else plgpu.layout_cast(x, layout)
