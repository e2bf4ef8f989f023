"""Check and time the Pallas paged-attention kernel on the GPU.

    PYTHONPATH=. python scripts/bench_kernels.py [--quick] [--sweep] [--log FILE]

1. correctness of `paged_attention_gpu` against the jnp reference on the GPU (bf16 inputs,
   ||out - ref|| / ||ref|| over the real tokens, all rows finite), over randomized shapes;
2. copy bandwidth (device-to-device, read + write bytes) as the ceiling;
3. timings (median over repeats of back-to-back calls after warm-up, inputs rotated among
   3 sets in disjoint parts of the pool) of the kernel, the jnp reference and JAX's own
   `jax.experimental.pallas.ops.gpu.paged_attention` (decode only), for decode batch 64,
   32 q heads, 8 KV heads, D=128, bf16, block 16 at contexts 512/2048/8192 (the per-sequence
   kernel, as the engine's decode steps), prefill 8 x 2048 causal and a mixed batch, and with
   `--only bucket` a prefill step's attention in the engine's padded 2048-token bucket, with
   `--only chunk` a 32k prompt's first and last 8192-token chunks (the Pallas and the Mosaic GPU
   prefill kernels); `--decode-kv-dtype fp8` times the decode over e4m3 pages; prints one table last.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
import traceback
import warnings
import zlib

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

warnings.filterwarnings("ignore", category=DeprecationWarning)

from ceilings import bench, copy_bandwidth  # noqa: E402

from jaxpaged.kernels.paged_attention import paged_attention_ref  # noqa: E402
try:
    from jaxpaged.kernels.attention_tiles import TileConfig, choose_config  # noqa: E402
except ImportError:  # an A/B tree from before the launch choices had their own module
    from jaxpaged.kernels.paged_attention_gpu import TileConfig, choose_config  # noqa: E402
from jaxpaged.kernels.paged_attention_gpu import paged_attention_gpu  # noqa: E402

LOG = []


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


# ---------------------------------------------------------------------------- inputs
def make_batch(key, plan, *, hq, hkv, d, bs, layers=2, sets=1, dtype=jnp.bfloat16, num_tokens=None,
               num_seqs=None, seed=0):
    """plan: [(num_computed, num_new)] per sequence. `sets` input sets share one pool, each in
    its own randomly permuted blocks (so rotating among them defeats the L2).
    Returns (pool_k, pool_v, [(q, query_start, seq_lens, block_tables), ...])."""
    rng = np.random.default_rng(seed)
    ctxs = [c + n for c, n in plan]
    nblk = [-(-c // bs) for c in ctxs]
    per_set = sum(nblk)
    nb = 1 + per_set * sets
    perm = rng.permutation(np.arange(1, nb)).astype(np.int32)
    s_pad = num_seqs or len(plan)
    t_real = sum(n for _, n in plan)
    t = num_tokens or t_real
    mb = max(nblk)
    kk, kv, kq = jax.random.split(key, 3)
    shape = (layers, hkv, nb, bs, d)
    k_pool = jax.random.normal(kk, shape, dtype)
    v_pool = jax.random.normal(kv, shape, dtype)
    out = []
    for i in range(sets):
        tables = np.zeros((s_pad, mb), np.int32)
        blocks = perm[i * per_set:(i + 1) * per_set]
        j0 = 0
        for j, n in enumerate(nblk):
            tables[j, :n] = blocks[j0:j0 + n]
            j0 += n
        qs = np.zeros(s_pad + 1, np.int32)
        lens = np.zeros(s_pad, np.int32)
        for j, (c, n) in enumerate(plan):
            qs[j + 1] = qs[j] + n
            lens[j] = c + n
        qs[len(plan) + 1:] = qs[len(plan)]
        q = jax.random.normal(jax.random.fold_in(kq, i), (t, hq, d), dtype)
        out.append((q, jnp.asarray(qs), jnp.asarray(lens), jnp.asarray(tables)))
    return k_pool, v_pool, out


def kv_bytes(plan, hkv, d, itemsize=2):
    return sum(c + n for c, n in plan) * hkv * d * itemsize * 2


def attn_flops(plan, hq, d, window=0):
    f = 0
    for c, n in plan:
        for_pos = np.arange(c, c + n) + 1  # keys seen by each new token
        if window:
            for_pos = np.minimum(for_pos, window)
        f += 4 * d * hq * int(for_pos.sum())
    return f


# ---------------------------------------------------------------------------- timing
# ---------------------------------------------------------------------------- checks
def rel_err(out, ref, n):
    o = np.asarray(out[:n], np.float64)
    r = np.asarray(ref[:n], np.float64)
    return float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30))


def check_case(name, plan, *, hq, hkv, d, bs, window=0, num_tokens=None, num_seqs=None, tol=1e-2,
               **kw):
    k_pool, v_pool, [(q, qs, lens, bt)] = make_batch(
        jax.random.key(zlib.crc32(name.encode())), plan, hq=hq, hkv=hkv, d=d, bs=bs,
        num_tokens=num_tokens, num_seqs=num_seqs, seed=len(name))
    scale = d ** -0.5
    ref = jax.jit(functools.partial(paged_attention_ref, scale=scale))(
        q.astype(jnp.float32), k_pool.astype(jnp.float32), v_pool.astype(jnp.float32), 1, qs, lens, bt,
        sliding_window=window)
    f = jax.jit(functools.partial(paged_attention_gpu, scale=scale, **kw))
    out = f(q, k_pool, v_pool, jnp.int32(1), qs, lens, bt, sliding_window=jnp.int32(window))
    out = np.asarray(out.astype(jnp.float32))
    n = int(qs[-1])
    err = rel_err(out, np.asarray(ref), n)
    finite = bool(np.isfinite(out).all())
    ok = err < tol and finite
    log(f"check {name:<38} rel_err={err:.2e} finite={finite} {'OK' if ok else 'FAIL'}")
    return ok


def run_checks(quick):
    rng = np.random.default_rng(1)
    cases = [
        ("decode g4 d128 bs16", [(int(c), 1) for c in rng.integers(0, 700, 13)], 32, 8, 128, 16, 0, 16, 16, {}),
        ("decode g8 d128 bs32 split4", [(int(c), 1) for c in rng.integers(0, 2000, 7)], 32, 4, 128, 32, 0, 8, 8,
         dict(num_splits=4)),
        ("decode g1 d64 bs16 window", [(int(c), 1) for c in rng.integers(0, 500, 9)], 8, 8, 64, 16, 100, 12, 12, {}),
        ("prefill g4 d128 bs16", [(0, 300), (0, 517)], 16, 4, 128, 16, 0, 832, 4, {}),
        ("chunked g8 d64 bs32 window", [(200, 77), (1000, 130)], 16, 2, 64, 32, 256, 256, 4, {}),
        ("mixed g4 d128 bs16", [(500, 1), (0, 120), (33, 1), (900, 200), (1500, 1)], 32, 8, 128, 16, 0, 400, 8,
         {}),
        ("mixed g4 d128 bs16 decode-config", [(500, 1), (0, 20), (33, 1), (900, 9)], 32, 8, 128, 16, 0, 64, 32,
         {}),
        ("mixed g7(pad) d128 bs16", [(50, 1), (0, 90), (700, 33)], 28, 4, 128, 16, 0, 128, 4, {}),
    ]
    if quick:
        cases = cases[:3]
    ok = True
    for name, plan, hq, hkv, d, bs, win, t, s, kw in cases:
        try:
            ok &= check_case(name, plan, hq=hq, hkv=hkv, d=d, bs=bs, window=win, num_tokens=t, num_seqs=s, **kw)
        except Exception as e:  # noqa: BLE001
            ok = False
            log(f"check {name:<38} ERROR {type(e).__name__}: {str(e)[:400]}")
            traceback.print_exc(limit=-3)
    return ok


# ---------------------------------------------------------------------------- benchmarks
ROWS = []


def row(case, impl, sec, kvb, copy_bw, flops=None, note=""):
    tbs = kvb / sec / 1e12 if sec else None
    ROWS.append((case, impl, sec * 1e6 if sec else None, tbs, 100 * tbs * 1e12 / copy_bw if sec else None,
                 flops / sec / 1e12 if (flops and sec) else None, note))
    log(f"  {case:<22} {impl:<34} {sec * 1e6 if sec else float('nan'):9.1f} us  "
        f"{tbs or float('nan'):5.2f} TB/s  {note}")


def try_bench(case, impl, fn, arg_sets, kvb, copy_bw, flops=None, note=""):
    try:
        sec = bench(fn, arg_sets)
        row(case, impl, sec, kvb, copy_bw, flops, note)
        return sec
    except Exception as e:  # noqa: BLE001
        log(f"  {case:<22} {impl:<34} ERROR {type(e).__name__}: {str(e)[:300]}")
        return None


def ours(scale, **kw):
    return jax.jit(lambda q, k, v, qs, lens, bt: paged_attention_gpu(
        q, k, v, jnp.int32(1), qs, lens, bt, scale=scale, **kw))


def check_vs_ref(case, fn, q, k_pool, v_pool, qs, lens, bt, n, scale):
    """Log `fn`'s error against the jnp reference on the same bf16 inputs over the first n tokens."""
    out = fn(q, k_pool, v_pool, qs, lens, bt)
    ref = jax.jit(functools.partial(paged_attention_ref, scale=scale))(q, k_pool, v_pool, 1, qs, lens, bt)
    log(f"check {case:<38} rel_err={rel_err(out.astype(jnp.float32), ref.astype(jnp.float32), n):.2e} "
        f"(vs bf16 reference)")


def bench_decode(ctx, copy_bw, sweep, check=True, b=64, hkv=8, t=None, table_keys=None, bs=16, layers=2,
                 kv_dtype=None):
    """Decode of `b` sequences at context `ctx` (an int, or "mixed": uniform in [17, 2048]) through
    the per-sequence kernel, as the engine's decode steps (`max_query_len=1`); `t` >= b: the step's
    padded bucket (padding sequences without context, as in the engine's smallest bucket);
    `table_keys`: block-table width in keys (the engine's max_model_len; default the longest
    context); `bs`: tokens per KV block; `layers`: of the pool (32: an engine-sized pool, over
    4 GiB, so the kernel computes 64-bit offsets; one input set then, else three); `kv_dtype`
    "fp8": e4m3 pools with unit scales (the check's reference reads the same values in bf16)."""
    hq, d = 4 * hkv, 128
    if ctx == "mixed":
        plan = [(int(c) - 1, 1) for c in np.random.default_rng(0).integers(17, 2049, b)]
    else:
        plan = [(ctx - 1, 1)] * b
    max_ctx = max(c + n for c, n in plan)
    k_pool, v_pool, sets = make_batch(jax.random.key(max_ctx), plan, hq=hq, hkv=hkv, d=d, bs=bs,
                                      sets=1 if layers > 2 else 3, layers=layers, num_tokens=t, num_seqs=t)
    fp8 = kv_dtype == "fp8"
    if fp8:
        k_pool, v_pool = k_pool.astype(jnp.float8_e4m3fn), v_pool.astype(jnp.float8_e4m3fn)
    width = -(-(table_keys or max_ctx) // bs)
    sets = [(q, qs, lens, jnp.pad(bt, ((0, 0), (0, max(0, width - bt.shape[1]))))) for q, qs, lens, bt in sets]
    scale = d ** -0.5
    kvb = kv_bytes(plan, hkv, d, k_pool.dtype.itemsize)
    case = f"decode b{b} ctx{ctx}" + (" fp8" if fp8 else "") + (f" hkv{hkv}" if hkv != 8 else "") + (
        f" S{t}" if t else "") + (f" table{table_keys}" if table_keys else "") + (f" bs{bs}" if bs != 16 else "") + (
        f" pool{k_pool.nbytes / 2**30:.0f}GiB" if layers > 2 else "")
    args = [(q, k_pool, v_pool, qs, lens, bt) for q, qs, lens, bt in sets]
    cfg, _ = choose_config(t or b, t or b, hq, hkv, d, width * bs)
    unit = jnp.ones(k_pool.shape[:2], jnp.float32) if fp8 else None
    decode = functools.partial(ours, scale, max_query_len=1, k_scale=unit, v_scale=unit)  # the per-sequence kernel
    if check:
        try:
            q, qs, lens, bt = sets[0]
            check_vs_ref(case, decode(), q, k_pool.astype(q.dtype), v_pool.astype(q.dtype), qs, lens, bt, b, scale)
        except Exception as e:  # noqa: BLE001
            log(f"check {case:<38} ERROR {type(e).__name__}: {str(e)[:300]}")
    try_bench(case, f"pallas (default n{cfg.block_n} sp{cfg.num_splits} w{cfg.num_warps} st{cfg.num_stages})",
              decode(), args, kvb, copy_bw)
    if sweep and b > 16:
        for bn, ns, nw, st in [(64, 1, 4, 3), (32, 1, 4, 4), (128, 1, 8, 3), (64, 2, 4, 4), (128, 2, 4, 3),
                               (64, 1, 4, 4), (32, 1, 4, 3), (32, 1, 2, 4), (64, 1, 8, 3), (128, 1, 4, 3),
                               (64, 1, 4, 2), (32, 1, 4, 6), (256, 1, 8, 2), (256, 1, 4, 2), (128, 1, 4, 4),
                               (128, 1, 2, 3)]:
            try_bench(case, f"pallas n{bn} sp{ns} w{nw} st{st}",
                      decode(decode_config=TileConfig(16, bn, ns, nw, st)), args, kvb, copy_bw)
    if sweep and b <= 16:  # split-KV for small batches: parts, the least keys per part, tiles
        for bn, ns, mk, nw, st in [(128, 16, 1024, 8, 3), (64, 16, 256, 4, 3), (64, 32, 256, 4, 3),
                                   (64, 64, 128, 4, 3), (128, 32, 256, 8, 3), (128, 32, 512, 4, 3),
                                   (128, 64, 256, 4, 3), (64, 32, 512, 4, 4), (128, 32, 256, 4, 2),
                                   (128, 32, 256, 4, 4), (32, 64, 128, 4, 4), (64, 128, 64, 4, 3)]:
            try_bench(case, f"pallas n{bn} sp{ns} min{mk} w{nw} st{st}",
                      decode(decode_config=TileConfig(16, bn, ns, nw, st, min_split_keys=mk)), args, kvb, copy_bw)
    if fp8:  # the peers below read bf16 pools
        return
    try_bench(case, "jnp reference", jax.jit(lambda q, k, v, qs, lens, bt: paged_attention_ref(
        q, k, v, 1, qs, lens, bt, scale=scale)), args, kvb, copy_bw)
    # JAX's own op: q pre-scaled, per-layer pool [Hkv, NB, bs, D], lengths [B].
    from jax.experimental.pallas.ops.gpu import paged_attention as jpa
    k1, v1 = k_pool[1], v_pool[1]
    jargs = [((q * scale).astype(q.dtype), k1, v1, bt, lens) for q, qs, lens, bt in sets]
    pages = width
    best = None
    for ks, ppcb in [(16, 8), (8, 8), (4, 16), (16, 4)]:
        if pages % ks or (pages // ks) % min(ppcb, pages // ks):
            continue
        f = jax.jit(functools.partial(jpa.paged_attention, k_splits=ks, pages_per_compute_block=ppcb))
        sec = try_bench(case, f"jax pallas op ks{ks} ppcb{ppcb}", f, jargs, kvb, copy_bw)
        if sec and (best is None or sec < best):
            best = sec
    del k_pool, v_pool, sets, args, jargs, k1, v1


def bench_decode_loop(ctx, b, copy_bw, sweep, bucket=16, layers=4, bs=16, hkv=8):
    """Decode at batch `b`, context `ctx`, in a step padded to `bucket` rows (the engine's
    smallest), timed on the device: `4 * layers` kernel calls chained in one jit (each call's
    output is the next one's q, the layer cycles so the L2 holds none of it), as a forward's
    layers run. Host dispatch, which floors a lone call near 45 us, is out."""
    hq, d = 4 * hkv, 128
    plan = [(ctx - 1, 1)] * b
    t = max(b, bucket)
    k_pool, v_pool, sets = make_batch(jax.random.key(ctx + b), plan, hq=hq, hkv=hkv, d=d, bs=bs, layers=layers,
                                      num_tokens=t, num_seqs=t)
    q, qs, lens, bt = sets[0]
    scale, n = d ** -0.5, 4 * layers
    case = f"loop b{b} ctx{ctx} S{t}"
    kvb = kv_bytes(plan, hkv, d)

    def looped(cfg):
        def f(q, k, v, qs, lens, bt):
            body = lambda i, x: paged_attention_gpu(x, k, v, i % layers, qs, lens, bt, scale=scale,  # noqa: E731
                                                    max_query_len=1, decode_config=cfg)
            return lax.fori_loop(0, n, body, q)
        return jax.jit(f)

    cfg, _ = choose_config(t, t, hq, hkv, d, bt.shape[1] * bs)
    configs = [(f"pallas (default n{cfg.block_n} sp{cfg.num_splits} min{cfg.min_split_keys} w{cfg.num_warps} "
                f"st{cfg.num_stages})", None)]
    if sweep:  # programs: split-KV's target over the live rows (0: two per SM)
        configs += [(f"pallas n{bn} sp{ns} min{mk} w{nw} st{st} programs{pr}",
                     TileConfig(16, bn, ns, nw, st, min_split_keys=mk, programs=pr))
                    for bn, ns, mk, nw, st, pr in [(128, 32, 256, 8, 3, 132), (128, 32, 256, 8, 3, 528),
                                                   (64, 32, 256, 4, 3, 0), (64, 64, 256, 4, 3, 528)]]
    for impl, c in configs:
        sec = bench(looped(c), [(q, k_pool, v_pool, qs, lens, bt)], reps=5)
        row(case, impl, sec / n, kvb, copy_bw)
    del k_pool, v_pool, sets


def bench_prefill(copy_bw, sweep):
    n, hq, hkv, d, bs = 2048, 32, 8, 128, 16
    plan = [(0, n)] * 8
    k_pool, v_pool, sets = make_batch(jax.random.key(7), plan, hq=hq, hkv=hkv, d=d, bs=bs, sets=2)
    scale = d ** -0.5
    case = "prefill 8x2048 causal"
    flops = attn_flops(plan, hq, d)
    kvb = kv_bytes(plan, hkv, d)
    args = [(q, k_pool, v_pool, qs, lens, bt) for q, qs, lens, bt in sets]
    # Correctness: dense causal attention on contiguous K/V (the reference would need
    # [Hkv, T, ctx, D] f32 = 137 GB here).
    q, qs, lens, bt = sets[0]

    def dense(q, k_pool, v_pool, bt, impl=None):
        kc = k_pool[1][:, bt].reshape(hkv, 8, -1, d).transpose(1, 2, 0, 3)  # [B, S, Hkv, D]
        vc = v_pool[1][:, bt].reshape(hkv, 8, -1, d).transpose(1, 2, 0, 3)
        qq = q.reshape(8, n, hq, d)
        return jax.nn.dot_product_attention(qq, kc, vc, scale=scale, is_causal=True,
                                            implementation=impl).reshape(8 * n, hq, d)

    out = ours(scale)(q, k_pool, v_pool, qs, lens, bt)
    ref = jax.jit(dense)(q.astype(jnp.float32), k_pool.astype(jnp.float32), v_pool.astype(jnp.float32), bt)
    log(f"check {case:<38} rel_err={rel_err(out.astype(jnp.float32), ref, 8 * n):.2e} (vs f32 dense)")
    del ref
    _, cfg = choose_config(8 * n, 8, hq, hkv, d, n)
    try_bench(case, f"pallas (default m{cfg.block_m} n{cfg.block_n} w{cfg.num_warps} st{cfg.num_stages})",
              ours(scale), args, kvb, copy_bw, flops)
    if sweep:
        for bm, bn, nw, st, sm, hf in [(128, 64, 4, 3, False, True), (128, 64, 4, 3, True, False),
                                       (128, 64, 4, 3, False, False), (128, 64, 4, 2, True, True),
                                       (128, 64, 4, 2, False, False), (128, 128, 8, 2, True, True),
                                       (128, 64, 8, 3, True, True), (64, 64, 4, 3, True, True)]:
            try_bench(case, f"pallas m{bm} n{bn} w{nw} st{st}{' nosplitmask' * (not sm)}{' lightfirst' * (not hf)}",
                      ours(scale, prefill_config=TileConfig(bm, bn, 1, nw, st, sm, hf)), args, kvb, copy_bw, flops)
        try_bench(case, "pallas mode=prefill (q-block kernel only)", ours(scale, mode="prefill"), args, kvb,
                  copy_bw, flops)
    dargs = [(q, k_pool, v_pool, bt) for q, qs, lens, bt in sets]
    for impl in ("cudnn", "xla"):
        try_bench(case, f"dense dot_product_attention {impl}", jax.jit(functools.partial(dense, impl=impl)),
                  dargs, kvb, copy_bw, flops, note="contiguous KV, +gather")
    bench_mosaic_dense(case, q, k_pool, v_pool, bt, hkv, d, scale, kvb, copy_bw, flops, dense, sweep)
    bench_mosaic_paged(case, args, out, scale, kvb, copy_bw, flops, sweep)
    log(f"  {case:<22} jnp reference: not run (needs [Hkv,T,ctx,D] f32 = 137 GB)")
    del k_pool, v_pool, sets, args, dargs


def bench_prefill_chunk(copy_bw):
    """A 32k prompt's first and last 8192-token chunks (the token budget) over their paged
    context: the Pallas kernel and the Mosaic GPU kernel (#29's second prefill target)."""
    hq, hkv, d, bs = 32, 8, 128, 16
    scale = d ** -0.5
    for cached in (0, 24576):
        plan = [(cached, 8192)]
        case = f"chunk 8192 at {cached // 1024}k"
        k_pool, v_pool, sets = make_batch(jax.random.key(cached), plan, hq=hq, hkv=hkv, d=d, bs=bs, sets=2)
        args = [(q, k_pool, v_pool, qs, lens, bt) for q, qs, lens, bt in sets]
        flops, kvb = attn_flops(plan, hq, d), kv_bytes(plan, hkv, d)
        pallas = ours(scale)
        out = pallas(*args[0])
        try_bench(case, "pallas (default)", pallas, args, kvb, copy_bw, flops)
        bench_mosaic_paged(case, args, out, scale, kvb, copy_bw, flops, False, [(64, 2, 1), (128, 2, 2)])
        del k_pool, v_pool, sets, args, out, pallas


def bench_mosaic_paged(case, args, want, scale, kvb, copy_bw, flops, sweep, configs=None):
    """This repository's paged Mosaic GPU prefill kernel (kernels/paged_prefill_mgpu.py, #29) on
    the paged batch itself; checked against the Pallas kernel's output `want`."""
    from jaxpaged.kernels.paged_prefill_mgpu import paged_prefill_mgpu

    def mosaic(block_kv, stages, wgs):
        return jax.jit(lambda q, k, v, qs, lens, bt: paged_prefill_mgpu(
            q, k, v, jnp.int32(1), qs, lens, bt, scale=scale, block_kv=block_kv, stages=stages, compute_wgs=wgs))

    configs = configs or [(64, 2, 1), (128, 2, 2), (64, 2, 2)] + [(128, 3, 2), (64, 3, 2), (128, 2, 1)] * sweep
    for block_kv, stages, wgs in configs:
        name = f"paged mosaic bkv{block_kv} st{stages} wg{wgs}"
        fn = mosaic(block_kv, stages, wgs)  # one compile for its check and its timing
        try:  # each config checked: a lowering error in one leaves the others measured
            got = fn(*args[0])
            err = rel_err(got.astype(jnp.float32), want.astype(jnp.float32), got.shape[0])
            log(f"check {case + ' ' + name:<38} rel_err={err:.2e} (vs the pallas kernel)")
            del got
        except Exception as e:  # noqa: BLE001
            log(f"  {case:<22} {name}: ERROR {type(e).__name__}: {str(e)[:300]}")
            continue
        try_bench(case, name, fn, args, kvb, copy_bw, flops, note="Mosaic GPU, paged KV")


def bench_mosaic_dense(case, q, k_pool, v_pool, bt, hkv, d, scale, kvb, copy_bw, flops, dense, sweep):
    """JAX's FA3-style Mosaic GPU kernel (`pallas/ops/gpu/attention_mgpu`: wgmma, TMA, warp
    specialisation) on the same batch made contiguous: dense [B, S, H, D] in float16, q and K/V
    from position 0 (no pages), q pre-scaled. What a Hopper kernel reaches here (#29)."""
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as mg
    except Exception as e:  # noqa: BLE001
        log(f"  {case:<22} attention_mgpu: not importable ({type(e).__name__}: {e})")
        return
    b, hq = 8, q.shape[1]
    f16 = jnp.float16  # jax 0.11.2's kernel: bf16 inputs fail its float16 smem copies
    kc = k_pool[1][:, bt].reshape(hkv, b, -1, d).transpose(1, 2, 0, 3).astype(f16)  # [B, S, Hkv, D]
    vc = v_pool[1][:, bt].reshape(hkv, b, -1, d).transpose(1, 2, 0, 3).astype(f16)
    qd = (q.astype(jnp.float32) * scale).astype(f16).reshape(b, -1, hq, d)

    def mosaic(block_kv):
        cfg = mg.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=True)
        return jax.jit(lambda qd, kc, vc: mg.attention(qd, kc, vc, cfg))

    try:
        out = mosaic(128)(qd, kc, vc).reshape(-1, hq, d)
        ref = jax.jit(dense)(q.astype(jnp.float32), k_pool.astype(jnp.float32), v_pool.astype(jnp.float32), bt)
        log(f"check {case + ' attention_mgpu':<38} rel_err={rel_err(out.astype(jnp.float32), ref, out.shape[0]):.2e} "
            "(vs f32 dense)")
        del out, ref
    except Exception as e:  # noqa: BLE001
        log(f"  {case:<22} attention_mgpu: ERROR {type(e).__name__}: {str(e)[:300]}")
        return
    for block_kv in (64, 128, 256) if sweep else (128,):
        try_bench(case, f"dense attention_mgpu bq64 bkv{block_kv}", mosaic(block_kv), [(qd, kc, vc)], kvb, copy_bw,
                  flops, note="Mosaic GPU, contiguous KV")


def bench_mixed(copy_bw):
    hq, hkv, d, bs = 32, 8, 128, 16
    dec = [(2047, 1)] * 64
    pre = [(0, 1024), (512, 512)]
    scale = d ** -0.5
    res = {}
    for name, plan in [("mixed", dec + pre), ("  decode part", dec), ("  prefill part", pre)]:
        k_pool, v_pool, sets = make_batch(jax.random.key(len(plan)), plan, hq=hq, hkv=hkv, d=d, bs=bs, sets=2)
        args = [(q, k_pool, v_pool, qs, lens, bt) for q, qs, lens, bt in sets]
        dec_only = name == "  decode part"
        res[name] = try_bench(f"{name} 64x2k+2x1k".strip(), "pallas (default: " + (
            "fused" if not dec_only else "decode") + ")", ours(scale, max_query_len=1 if dec_only else None), args,
                              kv_bytes(plan, hkv, d), copy_bw, attn_flops(plan, hq, d))
        if name == "mixed":
            for mode in ("split", "prefill"):
                try_bench("mixed 64x2k+2x1k", f"pallas mode={mode}", ours(scale, mode=mode), args,
                          kv_bytes(plan, hkv, d), copy_bw, attn_flops(plan, hq, d))
            q, qs, lens, bt = sets[0]
            check_vs_ref("mixed 64x2k+2x1k", ours(scale), q, k_pool, v_pool, qs, lens, bt, int(qs[-1]), scale)
        del k_pool, v_pool, sets, args
    if all(res.values()):
        log(f"  mixed / (decode + prefill) = {res['mixed'] / (res['  decode part'] + res['  prefill part']):.2f}")


def bench_bucket(copy_bw):
    """A prefill step's attention in the engine's 2048-token bucket, whose grid has slack for
    256 sequence slots: a few prompts (and decodes) among padding sequences; fused vs split."""
    hq, hkv, d, bs = 32, 8, 128, 16
    for plan, s in [([(0, 512)] * 4, 5), ([(0, 512)] * 4, 256), ([(0, 512)] * 3 + [(0, 500)] + [(600, 1)] * 12, 256),
                    ([(0, 2048)], 256), ([(1000, 1024), (0, 1024)], 256)]:
        k_pool, v_pool, sets = make_batch(jax.random.key(s + len(plan)), plan, hq=hq, hkv=hkv, d=d, bs=bs, sets=2,
                                          layers=32, num_tokens=2048, num_seqs=s)
        args = [(q, k_pool, v_pool, qs, lens, bt) for q, qs, lens, bt in sets]
        case = f"bucket2048 S{s} {len(plan)}seqs"
        q, qs, lens, bt = sets[0]
        scale = d ** -0.5
        check_vs_ref(case, ours(scale), q, k_pool, v_pool, qs, lens, bt, sum(n for _, n in plan), scale)
        for mode in ("fused", "split"):
            try_bench(case, f"pallas mode={mode}", ours(scale, mode=mode), args, kv_bytes(plan, hkv, d), copy_bw,
                      attn_flops(plan, hq, d), note=" + ".join(f"{n}@{c}" for c, n in sorted(set(plan))))
        del k_pool, v_pool, sets, args


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--log", default=None)
    ap.add_argument("--only", default="checks,decode,prefill,mixed")
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--decode-ctx", default=None,
                    help="comma-separated contexts, or 'mixed' (uniform in [17, 2048]); default 512,2048,8192")
    ap.add_argument("--decode-kv-heads", type=int, default=8, help="KV heads per device (tp=4 of Llama-3: 2)")
    ap.add_argument("--decode-bucket", type=int, default=None, help="sequences of the padded step (>= batch)")
    ap.add_argument("--decode-table", type=int, default=None, help="block-table width in keys (max_model_len)")
    ap.add_argument("--decode-block-size", default="16", help="comma-separated tokens per KV block")
    ap.add_argument("--loop-batch", default="1,4,8", help="--only loop: batches")
    ap.add_argument("--loop-ctx", default="8192,32768,131072", help="--only loop: contexts")
    ap.add_argument("--loop-bucket", type=int, default=16, help="--only loop: rows of the padded step")
    ap.add_argument("--decode-kv-dtype", choices=["bf16", "fp8"], default="bf16", help="the pools' dtype (fp8: e4m3)")
    ap.add_argument("--decode-layers", type=int, default=2, help="pool layers (32: engine-sized, 64-bit offsets)")
    a = ap.parse_args()
    only = a.only.split(",")
    dev = jax.devices()[0]
    log(f"jax {jax.__version__} on {dev.device_kind} ({jax.default_backend()}), "
        f"{time.strftime('%Y-%m-%d %H:%M')}")
    ok = True
    if "checks" in only:
        ok = run_checks(a.quick)
        log(f"checks: {'ALL OK' if ok else 'FAILURES'}")
    copy_bw = copy_bandwidth()
    log(f"copy bandwidth (read+write): {copy_bw / 1e12:.2f} TB/s")
    if "decode" in only:
        if a.decode_ctx:
            ctxs = [c if c == "mixed" else int(c) for c in a.decode_ctx.split(",")]
        else:
            ctxs = [512] if a.quick else [512, 2048, 8192]
        for ctx in ctxs:
            for bs in (int(x) for x in a.decode_block_size.split(",")):
                bench_decode(ctx, copy_bw, a.sweep, b=a.decode_batch, hkv=a.decode_kv_heads, t=a.decode_bucket,
                             table_keys=a.decode_table, bs=bs, layers=a.decode_layers, kv_dtype=a.decode_kv_dtype)
        if not a.quick and not a.decode_ctx:
            bench_decode(8192, copy_bw, False, b=4)  # small batch: split-KV
    if "loop" in only:  # small-batch decode (split-KV) timed on the device
        for b in (int(x) for x in a.loop_batch.split(",")):
            for ctx in (int(x) for x in a.loop_ctx.split(",")):
                bench_decode_loop(ctx, b, copy_bw, a.sweep, bucket=a.loop_bucket)
    if "prefill" in only and not a.quick:
        bench_prefill(copy_bw, a.sweep)
    if "chunk" in only and not a.quick:
        bench_prefill_chunk(copy_bw)
    if "mixed" in only and not a.quick:
        bench_mixed(copy_bw)
    if "bucket" in only:
        bench_bucket(copy_bw)
    lines = ["", f"| case | impl | us | TB/s KV read | % of copy BW ({copy_bw / 1e12:.2f} TB/s) | TFLOP/s |",
             "|---|---|---:|---:|---:|---:|"]
    for case, impl, us, tbs, pct, tf, note in ROWS:
        f = lambda x, p: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
        lines.append(f"| {case} | {impl}{' (' + note + ')' if note else ''} | {f(us, 1)} | {f(tbs, 2)} | "
                     f"{f(pct, 0)} | {f(tf, 0)} |")
    for l in lines:
        log(l)
    if a.log:
        with open(a.log, "w") as fh:
            fh.write("\n".join(LOG) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
