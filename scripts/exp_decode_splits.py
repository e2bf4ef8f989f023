"""EXPERIMENT: device time of the decode attention kernel for small batches, by tile config.

    PYTHONPATH=. python scripts/exp_decode_splits.py [--batches 1,4,16,64] [--ctx 512]

At batch 1 the per-sequence kernel takes ~17 us per layer (session 12 profile: 0.55 of a
4.6 ms 8B decode step) for 2 MB of KV: latency of one program per KV head walking 8 serial
64-key tiles. Shorter serial walks (longer tiles, or split-KV parts and the merge fusion)
trade that latency for more programs. Each config runs in the engine's shapes (bucket of 16
tokens and 16 sequences for batch <= 16, Llama-3-8B heads, a 32-layer pool, block table of
2048 keys) as a jitted chain of 32 calls, one per layer, and is timed from a profile trace:
all kernels of the chain (the merge fusion included) per call. Prints one table.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from profile_step import gpu_events, trace

from jaxpaged.kernels.paged_attention_gpu import TileConfig, choose_config, paged_attention_gpu

LAYERS, D, BS = 32, 128, 16
HQ, HKV = 32, 8  # Llama-3-8B; `--heads 16,2`: Llama-3-70B at tp=4 (per device)


def case(batch: int, ctx: int, table_keys: int, seed: int = 0):
    """Inputs of a decode step: `batch` sequences of context `ctx` in the engine's bucket."""
    t = s = max(16, 1 << (batch - 1).bit_length())
    rng = np.random.default_rng(seed)
    nblk = -(-ctx // BS)
    nb = 1 + batch * nblk
    tables = np.zeros((s, table_keys // BS), np.int32)
    tables[:batch, :nblk] = rng.permutation(np.arange(1, nb)).reshape(batch, nblk)
    qs = np.concatenate([np.arange(batch + 1), np.full(s - batch, batch)]).astype(np.int32)
    lens = np.concatenate([np.full(batch, ctx), np.zeros(s - batch)]).astype(np.int32)
    k = jax.random.normal(jax.random.key(1), (LAYERS, HKV, nb, BS, D), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(2), (LAYERS, HKV, nb, BS, D), jnp.bfloat16)
    q = jax.random.normal(jax.random.key(3), (t, HQ, D), jnp.bfloat16)
    return q, k, v, jnp.asarray(qs), jnp.asarray(lens), jnp.asarray(tables)


def chain(config: TileConfig | None):
    """32 calls, layer i reading layer i of the pool; each output feeds the next query."""
    def f(q, k, v, qs, lens, bt):
        for layer in range(LAYERS):
            q = paged_attention_gpu(q, k, v, layer, qs, lens, bt, scale=D ** -0.5, mode="decode",
                                    decode_config=config)
        return q
    return jax.jit(f)


def device_us_per_call(fn, args, reps: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        prof = trace(lambda: [jax.block_until_ready(fn(*args)) for _ in range(reps)], Path(d), "chain")
    return sum(e.duration_ns for e in gpu_events(prof)) / 1e3 / reps / LAYERS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--table-keys", type=int, default=2048)
    ap.add_argument("--heads", default="32,8", help="query heads, KV heads (per device)")
    ap.add_argument("--configs", default=None, help="comma-separated subset of the config names")
    a = ap.parse_args()
    global HQ, HKV
    HQ, HKV = (int(x) for x in a.heads.split(","))
    configs = {
        "engine default": None,  # n<keys per tile>, p<split-KV parts>
        "n64": TileConfig(16, 64),
        "n128": TileConfig(16, 128),
        "n256": TileConfig(16, 256, num_stages=2),
        "n512": TileConfig(16, 512, num_stages=2),
        "p2n64": TileConfig(16, 64, num_splits=2, min_split_keys=64),
        "p2n256": TileConfig(16, 256, num_splits=2, min_split_keys=256, num_stages=2),
        "p4n64": TileConfig(16, 64, num_splits=4, min_split_keys=64),
        "p4n128": TileConfig(16, 128, num_splits=4, min_split_keys=128),
        "p8n64": TileConfig(16, 64, num_splits=8, min_split_keys=64),
    }
    if a.configs:
        keep = a.configs.split(",")
        configs = {k: v for k, v in configs.items() if k in keep or k == "engine default"}
    batches = [int(b) for b in a.batches.split(",")]
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; decode attention, ctx {a.ctx}, "
          f"{HQ}/{HKV} heads, D {D}: device us per layer (kernel + merge)")
    print(f"{'config':22s}" + "".join(f"{'b' + str(b):>9s}" for b in batches))
    ref_out = {}
    for name, cfg in configs.items():
        line = f"{name:22s}"
        for b in batches:
            args = case(b, a.ctx, a.table_keys)
            try:
                fn = chain(cfg)
                out = np.asarray(fn(*args)[:b], np.float32)
                ref_out.setdefault(b, out)
                err = float(np.max(np.abs(out - ref_out[b])))
                line += f"{device_us_per_call(fn, args):8.1f}" + ("!" if err > 5e-2 else " ")
            except Exception as e:  # a config the kernel rejects
                line += f"{'err':>8s} "
                print(f"  {name} b{b}: {type(e).__name__}: {str(e)[:200]}")
        print(line, flush=True)
    t = max(16, 1 << (batches[0] - 1).bit_length())
    print(f"(engine default at b{batches[0]}: {choose_config(t, t, HQ, HKV, D, a.table_keys)[0]}; "
          "'!': output differs from the first config's by > 0.05)")


if __name__ == "__main__":
    main()
