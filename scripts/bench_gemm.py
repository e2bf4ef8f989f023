"""The quantized `linear()` of each weight kind against bf16, on one GPU: Llama-3-8B's four
linears per layer (qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down 14336->4096) chained
over several layers (so the weights stream from HBM, not L2; unrolled as in the model), at decode and prefill token
counts. Prints, per kind and token count, the time per layer, the weight-read bandwidth and the
TFLOP/s, and which GEMM the compiled program calls (the HLO custom-call targets: fp8 W8A8 must
reach cuBLASLt's fp8 GEMM, `__cublas$lt$matmul$f8`, not a dequantize and a bf16 GEMM).

    python scripts/bench_gemm.py [--tokens 1,8,64,256,2048] [--layers 8] [--kinds bf16,fp8,...,int4_dequant]
"""
from __future__ import annotations

import argparse
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.kernels.int4_matmul_gpu import int4_matmul_gpu
from jaxpaged.models.quantization.kernels import fp8_matmul, int4_matmul, quantized_matmul
from jaxpaged.models.quantization.quantize import quantize
from jaxpaged.models.quantization.packing import unpack_int4
from jaxpaged.models.quantization.weights import Fp8Weight, Int4Weight

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}


def make_layers(kind: str, layers: int, key) -> list[dict]:
    """Per layer, {name: weight [in, out] (bf16) or its quantized leaf}."""
    kind = kind.split(":")[0]
    scheme = kind.removesuffix("_tile").removesuffix("_mgpu").removesuffix("_dequant").removesuffix("_w8a16").removesuffix("_xla").removesuffix("_xla_grouped").removesuffix("_actorder").removesuffix("_gemv").removesuffix("_s4").removesuffix("_plane").removesuffix("_gemm").removesuffix("_reduce")
    out = []
    for layer in range(layers):
        ws = {}
        for i, (name, (n, m)) in enumerate(SHAPES.items()):
            k = jax.random.fold_in(jax.random.fold_in(key, layer), i)
            w = (jax.random.normal(k, (n, m), jnp.float32) / np.sqrt(n)).astype(jnp.bfloat16)
            if kind == "bf16_mgpu":  # the weight-streaming kernel with nothing to convert: its floor
                ws[name] = {"wt": w.T, "scale": jnp.ones((m,), jnp.float32)}
                continue
            ws[name] = w if kind == "bf16" else quantize(w, scheme, 0)
            if kind == "int8_mgpu":  # the Mosaic kernel reads [out, in]
                ws[name] = {"wt": ws[name].qweight.T, "scale": ws[name].scale}
            elif kind == "fp8_mgpu":
                ws[name] = {"wt": ws[name].qweight, "scale": ws[name].scale}
            elif kind.startswith("int4_mgpu"):  # signed int4 [out, in]; zeros shifted alike
                q = ws[name]
                ws[name] = {"wt": (unpack_int4(q.qweight).T - 8).astype(jnp.int4), "scale": None,
                            "s": q.scales.astype(jnp.bfloat16), "z": (q.zeros.astype(jnp.float32) - 8).astype(jnp.bfloat16)}
            if kind == "int4_actorder":  # GPTQ act-order: groups of rows in a random order, sorted at load
                q, g = ws[name], ws[name].group_size
                g_idx = np.random.default_rng(i).permutation(n) // g
                ws[name] = jax.device_put(Int4Weight.act_order(*(np.asarray(a) for a in (q.qweight, q.scales, q.zeros)),
                                                               g_idx))
            if kind == "int4_s4":  # XLA's signed int4 array [out, groups, group], K minor
                q, g = ws[name], ws[name].group_size
                ws[name] = {"q4": (unpack_int4(q.qweight).T - 8).astype(jnp.int4).reshape(m, n // g, g),
                            "s": q.scales.T.astype(jnp.float32), "z": (q.zeros.T.astype(jnp.float32) - 8)}
            if kind == "int4_gemv":  # packed words along K, K minor: [out, in / 8]
                ws[name] = {"qt": ws[name].qweight.T, "s": ws[name].scales.astype(jnp.float32),
                            "z": ws[name].zeros.astype(jnp.float32)}
            if kind.startswith("int4_xla"):  # XLA's own packed uint4 array: the convert left to its fusions
                g = ws[name].group_size
                q = unpack_int4(ws[name].qweight).reshape(n // g, g, m).astype(jnp.uint4)
                ws[name] = {"q": q, "s": ws[name].scales.astype(jnp.bfloat16),
                            "z": ws[name].zeros.astype(jnp.bfloat16)}
        out.append(ws)
    return out


def _int4_xla(x, w, grouped):
    """x @ ((q - zero) * scale) on XLA's uint4 arrays: dequantized then one dot, or (grouped) a
    dot per group of input rows whose sums are scaled and added."""
    q, s, z = w["q"], w["s"], w["z"]
    if not grouped:
        dense = ((q.astype(x.dtype) - z[:, None]) * s[:, None]).reshape(-1, q.shape[-1])
        return jnp.dot(x, dense, preferred_element_type=jnp.float32).astype(x.dtype)
    xg = x.reshape(x.shape[0], q.shape[0], q.shape[1])
    part = jnp.einsum("tgk,gkn->tgn", xg, q.astype(x.dtype), preferred_element_type=jnp.float32)
    part = part - jnp.sum(xg, -1, dtype=jnp.float32)[..., None] * z.astype(jnp.float32)
    return jnp.einsum("tgn,gn->tn", part, s.astype(jnp.float32)).astype(x.dtype)


def _int4_s4(x, w):
    """int4 weight-only matmul as XLA reduce fusions over its own int4 arrays [out, groups,
    group] (half a byte per value, K minor): per group the dot of x with q - 8, then
    sum_g scale * (dot_g - (zero - 8) * sum_g(x))."""
    q, s, z = w["q4"], w["s"], w["z"]
    xg = x.astype(jnp.float32).reshape(x.shape[0], q.shape[1], q.shape[2])
    dots = jnp.sum(xg[:, None] * q[None].astype(jnp.float32), -1)  # [T, out, groups]
    return jnp.sum((dots - z[None] * jnp.sum(xg, -1)[:, None]) * s[None], -1).astype(x.dtype)


def _int4_gemv(x, w):
    """int4 weight-only matmul as XLA reductions (no dot: multiply-and-reduce fusions) over
    K-minor packed words [out, in / 8]: per group of input rows the integer dot, then
    sum_g scale_g * (dot_g - zero_g * sum_g(x)); nibbles made floats by bits (2^23 + n)."""
    x32 = x.astype(jnp.float32)
    qt, s, z = w["qt"], w["s"], w["z"]
    n, words = qt.shape
    groups = s.shape[0]
    shifts = 4 * jnp.arange(8, dtype=jnp.int32)
    nib = (qt[:, :, None] >> shifts) & 0xF  # [out, in / 8, 8]: row 8i + j
    q = jax.lax.bitcast_convert_type(nib | 0x4B000000, jnp.float32) - 8388608.0
    q = q.reshape(n, groups, -1)
    xg = x32.reshape(x.shape[0], groups, -1)
    dots = jnp.sum(xg[:, None] * q[None], -1)  # [T, out, groups]
    y = jnp.einsum("tng,gn->tn", dots - z.T[None] * jnp.sum(xg, -1)[:, None], s)
    return y.astype(x.dtype)


def _mgpu(x, w, config):
    """The Mosaic GPU quantized-weight kernel (kernels/w8a16_matmul_gpu.py); 8-bit weights'
    sums scaled per channel (int4 is scaled in the kernel)."""
    from jaxpaged.kernels.w8a16_matmul_gpu import w8a16_matmul_tokens

    if w["scale"] is None:
        return w8a16_matmul_tokens(x, w["wt"], w["s"], w["z"], **config).astype(x.dtype)
    return (w8a16_matmul_tokens(x, w["wt"], **config) * w["scale"]).astype(x.dtype)


def _linear(x, w, dequant, config=None, reduce=None):
    if isinstance(w, dict) and "qt" in w:
        return _int4_gemv(x, w)
    if isinstance(w, dict) and "q4" in w:
        return _int4_s4(x, w)
    if isinstance(w, dict) and "wt" in w:
        return _mgpu(x, w, config or {})
    if isinstance(w, dict):
        return _int4_xla(x, w, dequant)
    if isinstance(w, jax.Array):
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    if isinstance(w, Fp8Weight) and dequant and reduce:  # weight-only, x unquantized, in a reduce fusion
        return (jnp.sum(x.astype(jnp.float32)[:, None, :] * w.qweight.astype(jnp.float32), axis=-1) * w.scale
                ).astype(x.dtype)
    if isinstance(w, Fp8Weight) and dequant:  # weight-only: the e4m3 -> bf16 convert left to XLA's GEMM fusion
        y = jax.lax.dot_general(x, w.qweight.astype(x.dtype), (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
        return (y * w.scale).astype(x.dtype)
    if isinstance(w, Fp8Weight) and reduce is not None:
        return fp8_matmul(x, w, reduce=reduce)
    if isinstance(w, Int4Weight) and (config or reduce is False):  # int4_plane, or int4:block_n=N...
        return int4_matmul_gpu(x, w.qweight, w.scales, w.zeros, **config,
                               **({"matvec": False} if reduce is False else {}))
    return int4_matmul(x, w, kernel=False) if dequant else quantized_matmul(x, w)


@functools.partial(jax.jit, static_argnames=("dequant", "config", "reduce"))
def forward(x, layers, dequant=False, config=None, reduce=None):
    linear = functools.partial(_linear, dequant=dequant, config=dict(config or ()), reduce=reduce)

    for w in layers:  # unrolled, as the model's layers: `lax.scan` would copy each layer's weights
        a = linear(x, w["qkv"])[:, :4096]
        x = x + linear(a, w["o"])
        g = linear(x, w["gate_up"])
        x = x + linear(jax.nn.silu(g[:, :14336]) * g[:, 14336:], w["down"])
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True)).astype(x.dtype)
    return x


def gemm_targets(compiled_text: str) -> str:
    targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled_text)))
    gemms = [t for t in targets if "cublas" in t or "gemm" in t or "matmul" in t]
    triton = "triton_gemm" in compiled_text or '"kind":"__triton_gemm"' in compiled_text
    return ",".join(gemms) + (",triton_gemm" if triton else "") or "none"


def weight_bytes(layers) -> int:
    return sum(leaf.size // 2 if leaf.dtype in (jnp.uint4, jnp.int4) else leaf.nbytes for leaf in jax.tree.leaves(layers))


def _mgpu_config(kind: str) -> tuple | None:
    """`fp8_mgpu:block_n=128:stages=8` -> the kernel's launch config (its defaults where absent);
    `_tile` kinds scale int4 tiles instead of sums."""
    config = tuple((key, int(value)) for key, value in (f.split("=") for f in kind.split(":")[1:]))
    return config + ((("scale_acc", False),) if "_tile" in kind else ()) or None


def device_time(call, iters: int, layers: int, out: str) -> tuple[float, str] | None:
    """Device time per layer (us) of `iters` calls, from a profile: the sum of the GPU's kernel
    durations (no host dispatch, no launch gaps), and its three costliest kernels (None: no GPU
    in the profile)."""
    import collections
    import tempfile
    from pathlib import Path

    from profile_step import gpu_events, trace

    Path(out).mkdir(parents=True, exist_ok=True)
    prof = trace(lambda: [call() for _ in range(iters)], Path(tempfile.mkdtemp(dir=out)), "gemm")
    per = collections.Counter()
    for e in gpu_events(prof):
        per[e.name] += e.duration_ns
    if not per:
        return None
    total = sum(per.values()) / 1e3 / iters / layers
    top = ", ".join(f"{name[:40]} {ns / 1e3 / iters / layers:.1f}" for name, ns in per.most_common(3))
    return total, top


def bench_kind(kind: str, tokens: list[int], layers: int, iters: int, profile_dir: str | None = None) -> list[tuple]:
    weights = make_layers(kind, layers, jax.random.key(0))
    wb = weight_bytes(weights) / layers
    flops = 2 * sum(n * m for n, m in SHAPES.values())
    rows = []
    for t in tokens:
        x = jax.random.normal(jax.random.key(t), (t, 4096), jnp.bfloat16)
        compiled = forward.lower(x, weights, dequant=kind.endswith(("_dequant", "_w8a16", "_grouped")),
                                 config=_mgpu_config(kind),
                                 reduce={"fp8_gemm": False, "fp8_reduce": True, "fp8_reduce_w8a16": True,
                                         "int4_plane": False}.get(kind)).compile()
        gemm = gemm_targets(compiled.as_text())
        compiled(x, weights).block_until_ready()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            compiled(x, weights).block_until_ready()
            times.append(time.perf_counter() - start)
        per_layer = float(np.median(times)) / layers
        device = profile_dir and device_time(lambda: compiled(x, weights).block_until_ready(), iters, layers,
                                             profile_dir)
        if profile_dir and not device:
            print(f"  {kind:12s} T={t:5d} --device-time: no GPU kernels in the profile, the wall time stands",
                  flush=True)
        if device:  # the device's time instead of the wall's
            per_layer_us, top = device
            print(f"  {kind:12s} T={t:5d} wall {per_layer * 1e6:8.1f} us/layer, device {per_layer_us:8.1f}: {top}",
                  flush=True)
            per_layer = per_layer_us / 1e6
        rows.append((kind, t, per_layer * 1e6, wb / per_layer / 1e12, flops * t / per_layer / 1e12, wb / 2**20, gemm))
        print(f"  {kind:12s} T={t:5d} {per_layer * 1e6:8.1f} us/layer", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,8,64,256,2048")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kinds", default="bf16,fp8,fp8_w8a16,int8,int8_w8a8,int4,int4_dequant",
                    help="int4: the Pallas kernel up to 256 tokens on one GPU (int4_actorder: on act-order weights, "
                         "x gathered into their sorted row order per step); int4_dequant: dequantize, then XLA's "
                         "GEMM; fp8_w8a16: fp8 weights converted to bf16 inside XLA's GEMM, x unquantized; "
                         "int4_xla / int4_xla_grouped: XLA's uint4 arrays, dequantized in its fusions (one dot, "
                         "or a dot per group); fp8_mgpu / int8_mgpu / int4_mgpu (int4_mgpu_tile: scaled tiles)[:block_n=N][:block_k=N][:stages=N][:splits=N]: the Mosaic GPU "
                         "8-bit-weight kernel (kernels/w8a16_matmul_gpu.py), up to 64 tokens; bf16_mgpu: bf16 "
                         "weights through it (nothing to convert: the kernel's floor); fp8: W8A8, the reduce "
                         "fusion up to FP8_REDUCE_MAX_TOKENS on a GPU, else cuBLASLt's fp8 GEMM (fp8_gemm / "
                         "fp8_reduce: the one or the other at every size; fp8_reduce_w8a16: the reduce with x unquantized, no "
                         "activation amax and convert); int4_gemv: weight-only int4 in XLA "
                         "multiply-and-reduce fusions over K-minor packed words; int4_s4: the same over XLA's "
                         "int4 arrays [out, in]; int4_plane: the Pallas kernel's MMA form at every size (int4 takes its "
                         "FMA form at 1 token); int4[:block_n=N][:num_warps=N][:num_stages=N][:splits=N]: the Pallas "
                         "kernel's launch config")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device-time", metavar="DIR", help="report the device's kernel time per layer (a profile "
                    "in DIR) instead of the wall time, which includes dispatch and launch gaps")
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {args.layers} layers of Llama-3-8B's linears")
    rows = []
    for kind in args.kinds.split(","):
        try:
            rows += bench_kind(kind, tokens, args.layers, args.iters, args.device_time)
        except Exception as e:  # a kernel that does not lower: the other kinds still run
            print(f"  {kind}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    print(f"\n{'kind':12s} {'tokens':>6s} {'us/layer':>9s} {'weights TB/s':>12s} {'TFLOP/s':>8s} {'MiB/layer':>9s}  GEMM calls")
    for kind, t, us, tbs, tf, mib, gemm in rows:
        print(f"{kind:12s} {t:6d} {us:9.1f} {tbs:12.2f} {tf:8.1f} {mib:9.1f}  {gemm}")


if __name__ == "__main__":
    main()
