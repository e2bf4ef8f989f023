"""Is a fused gate/up + SwiGLU kernel faster than XLA's GEMM + SiLU-multiply in the MLP?

    PYTHONPATH=. python scripts/exp_swiglu.py [--rows 16,64,256] [--sweep]

A chain of 8 Llama-3-8B MLPs (distinct weights, H 4096, I 14336, bf16; the next layer's input
is the previous one's output, so nothing is skipped or cached in L2) as XLA compiles it
(`swiglu_ref` then `@ w_down`) and with `swiglu_gpu` in its place; per MLP: microseconds, and
the gate/up TFLOP/s implied by subtracting a chain of the down GEMMs alone (their input made
by a small concatenate of the previous output, so slightly over the down GEMM's cost). Checks the
kernel against the reference first. `--sweep` times every tile config in CONFIGS.

The kernel (Pallas, Triton lowering): each program computes one [block_m, block_n] tile of
both products from the same `h` tile (two f32 accumulators) and writes `silu(gate) * up`
only, saving XLA's separate SiLU-multiply kernel and the [T, 2, I] round trip.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

sys.path.insert(0, "scripts")
from ceilings import bench  # noqa: E402


def swiglu_ref(h: jax.Array, w_gate_up: jax.Array) -> jax.Array:
    """h: [T, H]; w_gate_up: [H, 2, I] -> silu(h @ w[:, 0]) * (h @ w[:, 1]): [T, I] (h's dtype)."""
    gate_up = jnp.einsum("th,hpi->tpi", h, w_gate_up)
    return jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def choose_config(t: int) -> GemmConfig:
    """Tiles by the (static, bucketed) row count."""
    if t <= 16:
        return GemmConfig(16, 64, 256, 4, 4)
    if t <= 64:
        return GemmConfig(64, 64, 128, 4, 4)
    return GemmConfig(128, 64, 64, 4, 4)


def _kernel(h_ref, w_ref, o_ref, *, block_k: int, k_steps: int):
    """h_ref: [block_m, H]; w_ref: [H, 2, block_n]; o_ref: [block_m, block_n]."""
    def body(i, acc):
        g, u = acc
        ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        x = h_ref[:, ks]
        g += jnp.dot(x, w_ref[ks, 0, :], preferred_element_type=jnp.float32)
        u += jnp.dot(x, w_ref[ks, 1, :], preferred_element_type=jnp.float32)
        return g, u

    zeros = jnp.zeros(o_ref.shape, jnp.float32)
    g, u = lax.fori_loop(0, k_steps, body, (zeros, zeros))
    o_ref[...] = (g * jax.nn.sigmoid(g) * u).astype(o_ref.dtype)


def supported(t: int, hidden: int, inter: int, config: GemmConfig | None = None) -> bool:
    """Whether the kernel tiles these shapes (power-of-two tiles that divide them)."""
    c = config or choose_config(t)
    return t % min(c.block_m, t) == 0 and hidden % c.block_k == 0 and inter % c.block_n == 0 and (
        hidden & (hidden - 1)) == 0


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def swiglu_gpu(h: jax.Array, w_gate_up: jax.Array, *, config: GemmConfig | None = None,
               interpret: bool | None = None) -> jax.Array:
    """Same contract as `swiglu_ref`; `supported(...)` must hold for the shapes. `interpret`
    defaults to True off-GPU."""
    t, hidden = h.shape
    _, two, inter = w_gate_up.shape
    assert two == 2 and w_gate_up.shape[0] == hidden, (h.shape, w_gate_up.shape)
    c = config or choose_config(t)
    assert supported(t, hidden, inter, c), (t, hidden, inter, c)
    bm = min(c.block_m, t)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    kern = functools.partial(_kernel, block_k=c.block_k, k_steps=hidden // c.block_k)
    return pl.pallas_call(
        kern,
        out_shape=jax.ShapeDtypeStruct((t, inter), h.dtype),
        grid=(inter // c.block_n, t // bm),
        in_specs=[pl.BlockSpec((bm, hidden), lambda j, i: (i, 0)),
                  pl.BlockSpec((hidden, 2, c.block_n), lambda j, i: (0, 0, j))],
        out_specs=pl.BlockSpec((bm, c.block_n), lambda j, i: (i, j)),
        compiler_params=pltriton.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages),
        interpret=interpret,
        name="swiglu",
    )(h, w_gate_up)


H, I, LAYERS = 4096, 14336, 8
CONFIGS = [GemmConfig(*c) for c in [
    (16, 64, 256, 4, 4), (16, 128, 128, 4, 4), (16, 64, 128, 4, 5), (16, 32, 256, 4, 4),
    (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 5),
    (128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 64, 64, 8, 4), (64, 128, 64, 4, 3), (256, 64, 64, 8, 3),
    (128, 32, 64, 4, 4), (128, 64, 128, 8, 3)]]


def chain(mlp):
    def run(x, ws):
        for w_gu, w_d in ws:
            x = (mlp(x, w_gu) @ w_d) * jnp.asarray(0.05, x.dtype)
        return x
    return jax.jit(run)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="16,64,128,256")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    print(jax.devices()[0].device_kind, "jax", jax.__version__)
    keys = jax.random.split(jax.random.key(0), 2 * LAYERS)
    ws = [(jax.random.normal(keys[2 * i], (H, 2, I), jnp.bfloat16) * 0.02,
           jax.random.normal(keys[2 * i + 1], (I, H), jnp.bfloat16) * 0.02) for i in range(LAYERS)]
    for t in [int(r) for r in args.rows.split(",")]:
        xs = [(jax.random.normal(jax.random.key(10 + j), (t, H), jnp.bfloat16), ws) for j in range(2)]
        h = xs[0][0]
        ref = swiglu_ref(h, ws[0][0]).astype(jnp.float32)
        err = float(jnp.linalg.norm(swiglu_gpu(h, ws[0][0]).astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
        t_xla = bench(chain(swiglu_ref), xs) / LAYERS
        t_down = bench(chain(lambda x, w: jnp.concatenate([x] * -(-I // H), 1)[:, :I]), xs) / LAYERS
        flops = 2 * t * H * 2 * I
        print(f"rows {t}: rel err {err:.1e}; XLA MLP {1e6 * t_xla:.1f} us; down alone (+concat) {1e6 * t_down:.1f} us")
        configs = CONFIGS if args.sweep else [choose_config(t)]
        for c in configs:
            if c.block_m > max(t, 16) * 2 or not supported(t, H, I, c):
                continue
            try:
                tk = bench(chain(lambda x, w, c=c: swiglu_gpu(x, w, config=c)), xs) / LAYERS
            except Exception as e:  # noqa: BLE001 - a config Triton cannot compile
                print(f"  {c}: failed {type(e).__name__}: {str(e)[:120]}")
                continue
            gu = tk - t_down
            print(f"  {c}: MLP {1e6 * tk:.1f} us ({100 * (t_xla - tk) / t_xla:+.1f}% vs XLA); "
                  f"gate/up+silu ~{1e6 * gu:.1f} us, {flops / gu / 1e12:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
