"""Time fp8 W8A8's row kernels (jaxpaged/kernels/fp8_quant_gpu.py) on the GPU against XLA's
fusion of their jnp reference, and optionally another revision's kernels, at Llama-3-8B's widths.

    PYTHONPATH=. python scripts/bench_row_kernels.py [--tokens 1,256,2048] [--sweep] [--ab-tree .ab/old]

silu_mul_quant: sums [T, 2, 14336] float32 -> e4m3 [T, 14336]; quantize_rows with the norm:
x [T, 4096] bf16 -> e4m3. Each row: microseconds per call on the device (calls chained in one
jit over 3 input sets, so the L2 holds none at 2,048 tokens and dispatch is out) and the
bandwidth of the bytes a call must move (read + written) against the device's copy bandwidth.
`--sweep` adds silu_mul_quant launches (rows, columns, warps). Prints one table last.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import pathlib
import sys

import jax
import jax.numpy as jnp
from jax import lax

from ceilings import bench, copy_bandwidth

from jaxpaged.kernels import fp8_quant_gpu
from jaxpaged.kernels.fp8_quant import quantize_rows_ref, silu_mul_quant_ref

ROWS = []


def load_tree_kernels(tree: str):
    """Another revision's fp8_quant_gpu.py, as its own module (its helpers from this tree)."""
    path = pathlib.Path(tree) / "jaxpaged/kernels/fp8_quant_gpu.py"
    spec = importlib.util.spec_from_file_location("ab_fp8_quant_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def chained(fn, sets, n: int = 8):
    """One jit calling `fn` on each input set `n` times in a row, each call's scale feeding the
    next call's last input (the token scales; the norm weight), in that input's dtype, so none
    is hoisted or dropped: the device's time, not dispatch."""
    def run(sets):
        def body(_, acc):
            for x, *rest in sets:
                _, s = fn(x, *rest[:-1], (rest[-1] + acc).astype(rest[-1].dtype))
                acc = s[0, 0] * 1e-30
            return acc
        return lax.fori_loop(0, n, body, jnp.float32(0))
    return jax.jit(run), len(sets) * n


def record(case: str, impl: str, fn, arg_sets, nbytes: int, copy_bw: float):
    try:
        loop, calls = chained(fn, arg_sets)
        sec = bench(loop, [(arg_sets,)], reps=5) / calls
    except Exception as e:  # noqa: BLE001 - a launch that does not compile is a row, not the end
        print(f"{case:<22} {impl:<34} ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
        return
    ROWS.append((case, impl, sec * 1e6, nbytes / sec / 1e12, 100 * nbytes / sec / copy_bw))
    print(f"{case:<22} {impl:<34} {sec * 1e6:8.1f} us {nbytes / sec / 1e12:5.2f} TB/s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,256,2048")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--ab-tree", default=None, help="a folder holding another revision's jaxpaged/")
    args = ap.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
    copy_bw = copy_bandwidth()
    other = load_tree_kernels(args.ab_tree) if args.ab_tree else None
    width, hidden = 14336, 4096
    for t in map(int, args.tokens.split(",")):
        keys = jax.random.split(jax.random.key(t), 3)
        sets = [(jax.random.normal(k, (t, 2, width), jnp.float32) * 2000, jnp.full((2, width), 0.001, jnp.float32),
                 jnp.full((t, 1), 0.004, jnp.float32)) for k in keys]  # (sums, col_scale, row_scale)
        case, nbytes = f"silu_mul_quant T={t}", t * width * (2 * 4 + 1) + 2 * width * 4
        dt = jnp.bfloat16
        record(case, "xla (jnp reference)", lambda s, c, r: silu_mul_quant_ref(s, r, c, dt), sets, nbytes, copy_bw)
        if other is not None:
            record(case, f"kernel of {args.ab_tree}", lambda s, c, r: other.silu_mul_quant(s, r, c, dt), sets,
                   nbytes, copy_bw)
        default = fp8_quant_gpu.silu_launch(t, width)
        record(case, f"kernel {default}", lambda s, c, r: fp8_quant_gpu.silu_mul_quant(s, r, c, dt), sets,
               nbytes, copy_bw)
        if args.sweep and t >= 256:
            for launch in itertools.product([1, 2, 4], [1024, 2048], [4, 8, 16]):
                if launch != default:
                    record(case, f"kernel {launch}", lambda s, c, r, la=launch: fp8_quant_gpu.silu_mul_quant(
                        s, r, c, dt, launch=la), sets, nbytes, copy_bw)
        xs = [(jax.random.normal(k, (t, hidden), jnp.bfloat16), jnp.ones((hidden,), jnp.bfloat16)) for k in keys]
        case, nbytes = f"quantize_rows T={t}", t * hidden * 3 + hidden * 2
        record(case, "xla (jnp reference)", lambda x, w: quantize_rows_ref(x, w, 1e-5), xs, nbytes, copy_bw)
        record(case, "kernel", lambda x, w: fp8_quant_gpu.quantize_rows(x, w, 1e-5), xs, nbytes, copy_bw)
    print(f"\ncopy bandwidth {copy_bw / 1e12:.2f} TB/s\n{'case':<22} {'impl':<34} {'us':>8} {'TB/s':>6} {'% copy':>7}")
    for case, impl, us, tbs, pct in sorted(ROWS, key=lambda r: (r[0], r[2])):
        print(f"{case:<22} {impl:<34} {us:8.1f} {tbs:6.2f} {pct:6.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
