"""The Pallas paged-attention kernel against the jnp reference.

On CPU the kernel runs in Pallas interpret mode (slow: cases are few and small). Bigger
cases are marked slow and run only where a GPU is present.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.kernels.paged_attention import paged_attention_ref
from jaxpaged.kernels.attention_tiles import TileConfig, choose_config, short_query_len
from jaxpaged.kernels.paged_attention_gpu import paged_attention_gpu

ON_GPU = jax.default_backend() == "gpu"
# f32 cases: interpret mode is exact f32; on the GPU the kernel's f32 dots run in TF32 (Triton's
# default for f32 inputs), i.e. inputs rounded to a 10-bit mantissa: ~3e-4 off here.
F32_TOL = 2e-3 if ON_GPU else 2e-5
MODEL_TOL = 4e-3 if ON_GPU else 1e-4  # a whole f32 forward (XLA's GEMMs too): 8.4e-4 off on an H200


def make_case(rng, plan, *, hq, hkv, d, bs, num_tokens=None, num_seqs=None, layers=2, dtype=np.float32):
    """plan: [(num_computed, num_new)] per sequence; padded to num_tokens / num_seqs.
    Blocks are a random permutation (block 0 stays the scratch block); the pool is random
    everywhere, so reading outside a sequence's context would show."""
    nblocks = [-(-(c + n) // bs) for c, n in plan]
    nb = 1 + sum(nblocks) + 2
    perm = rng.permutation(np.arange(1, nb))
    s = num_seqs or len(plan)
    t = num_tokens or sum(n for _, n in plan)
    tables = np.zeros((s, max(max(nblocks), 1) + 1), np.int32)  # one spare column of padding
    qs = np.zeros(s + 1, np.int32)
    lens = np.zeros(s, np.int32)
    i = 0
    for j, ((c, n), nbk) in enumerate(zip(plan, nblocks)):
        tables[j, :nbk] = perm[i:i + nbk]
        i += nbk
        qs[j + 1] = qs[j] + n
        lens[j] = c + n
    qs[len(plan) + 1:] = qs[len(plan)]
    k = rng.standard_normal((layers, hkv, nb, bs, d)).astype(dtype)
    v = rng.standard_normal((layers, hkv, nb, bs, d)).astype(dtype)
    q = rng.standard_normal((t, hq, d)).astype(dtype)
    return tuple(map(jnp.asarray, (q, k, v, qs, lens, tables)))


def check(plan, *, hq, hkv, d, bs, window=0, num_tokens=None, num_seqs=None, seed=0, tol=F32_TOL, **kw):
    rng = np.random.default_rng(seed)
    q, k, v, qs, lens, bt = make_case(rng, plan, hq=hq, hkv=hkv, d=d, bs=bs, num_tokens=num_tokens,
                                      num_seqs=num_seqs)
    scale = 1.0 / np.sqrt(d)
    layer = jnp.int32(1)
    win = jnp.int32(window)
    ref = jax.jit(functools.partial(paged_attention_ref, scale=scale))(
        q, k, v, layer, qs, lens, bt, sliding_window=win)
    out = jax.jit(functools.partial(paged_attention_gpu, scale=scale, **kw))(
        q, k, v, layer, qs, lens, bt, sliding_window=win)
    assert out.shape == q.shape and out.dtype == q.dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()  # padding tokens included
    n = int(qs[-1])
    np.testing.assert_allclose(out[:n], ref[:n], atol=tol, rtol=tol)
    return out


# (plan, hq, hkv, d, bs, window, T, S, tuning kwargs); chosen to cover head dim 64/128,
# GQA 1/4/8 (and a non-power-of-two group), block 16/32, decode / chunked / fresh prefill in
# one batch, padding tokens and padding sequences, sliding window, split-KV.
CASES = {
    # small buckets (T <= DECODE_ONLY_MAX_TOKENS): the per-sequence kernel alone
    "decode g4 d128 bs16": ([(37, 1), (0, 1), (130, 1), (16, 1), (63, 1)], 8, 2, 128, 16, 0, 8, 7, {}),
    "decode g8 d64 bs32 split": ([(300, 1), (5, 1), (96, 1)], 8, 1, 64, 32, 0, 4, 4,
                                 dict(decode_config=TileConfig(16, 64, num_splits=4, min_split_keys=64))),
    "decode g1 d64 bs16 window": ([(90, 1), (3, 1), (47, 1)], 2, 2, 64, 16, 20, 4, 3, {}),
    "decode bucket with a chunk": ([(20, 1), (8, 9), (0, 3)], 4, 1, 64, 16, 0, 16, 8, dict(num_splits=2)),
    "large bucket, short queries (hint)": ([(37, 1), (0, 5), (130, 1)], 8, 2, 64, 16, 0, 64, 4, dict(max_query_len=32)),
    # larger buckets: per-sequence kernel for short queries + q-block kernel (two launches
    # when T <= 2S, else one)
    "mixed g4 d64 bs16": ([(60, 1), (6, 40), (0, 29), (17, 1)], 8, 2, 64, 16, 0, 80, 5, {}),
    "mixed g8 d128 bs32 window": ([(100, 30), (40, 1), (0, 50)], 8, 1, 128, 32, 24, 96, 4, {}),
    "prefill g1 d64 bs32": ([(0, 45), (0, 70)], 2, 2, 64, 32, 0, 128, 3, {}),
    "mixed g7 (padded group)": ([(25, 1), (3, 20)], 7, 1, 64, 16, 0, 48, 3, {}),
    "mixed small tiles": ([(40, 23), (0, 1), (77, 9)], 4, 1, 64, 16, 9, 40, 4, dict(block_m=16, block_n=16)),
    # two launches with split-KV parts in the first: the chunk's rows and the padding are the
    # second kernel's (their parts in the first are never written)
    "two launches, split-KV": ([(300, 1), (40, 20), (5, 1)], 8, 2, 64, 16, 0, 32, 5,
                               dict(mode="split", decode_config=TileConfig(16, 64, num_splits=4, min_split_keys=64))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name):
    plan, hq, hkv, d, bs, win, t, s, kw = CASES[name]
    check(plan, hq=hq, hkv=hkv, d=d, bs=bs, window=win, num_tokens=t, num_seqs=s, seed=len(name), **kw)


@pytest.mark.parametrize("mode", ["decode", "prefill", "split"])
def test_kernel_modes(mode):
    """Either kernel alone, or both in two launches, handles any batch (mixed here; the
    default for it is the fused single launch), padding included."""
    check([(60, 1), (6, 40), (0, 3), (17, 1)], hq=8, hkv=2, d=64, bs=16, num_tokens=64, num_seqs=6, mode=mode)


def test_short_mode_writes_the_short_sequences_rows():
    """mode="short" (the Mosaic route's decode rows): the rows of the sequences with at most
    `short_query_len` new tokens match the reference; the 40-token chunk's are left unwritten."""
    plan = [(60, 1), (6, 40), (0, 3), (17, 1)]
    q, k, v, qs, lens, bt = make_case(np.random.default_rng(3), plan, hq=8, hkv=2, d=64, bs=16, num_tokens=64,
                                      num_seqs=6)
    assert short_query_len(choose_config(64, 6, 8, 2, 64, bt.shape[1] * 16)[0], 4) == 4
    args = (q, k, v, jnp.int32(1), qs, lens, bt)
    ref = np.asarray(paged_attention_ref(*args, scale=0.125), np.float32)
    out = np.asarray(jax.jit(functools.partial(paged_attention_gpu, scale=0.125, mode="short"))(*args), np.float32)
    rows = np.r_[0:1, 41:45]  # the 1-, 3- and 1-token sequences
    np.testing.assert_allclose(out[rows], ref[rows], atol=F32_TOL, rtol=F32_TOL)


def test_long_context_decode_split():
    """Contexts up to 2k, split-KV over many blocks."""
    check([(2047, 1), (1000, 1), (1, 1)], hq=4, hkv=1, d=64, bs=32, num_tokens=4, num_seqs=4,
          num_splits=4, block_n=64)


@pytest.mark.parametrize("window", [0, 3000])
def test_split_kv_at_128k_contexts(window):
    """Decode at contexts of 131,072, 70,002 and 6 tokens in one batch (and a padding row):
    the default config allows 128 parts for 4 rows; the kernel gives each of the 3 live rows
    88 (264 programs over 3 rows of one KV head), each at least 256 keys (the short one whole),
    then merges them; with a sliding window only the window's keys count. Small heads keep
    interpret mode to seconds."""
    from jaxpaged.kernels.attention_tiles import choose_config

    assert choose_config(4, 4, 2, 1, 16, 131072)[0].num_splits == 128
    check([(131071, 1), (70001, 1), (5, 1)], hq=2, hkv=1, d=16, bs=256, window=window, num_tokens=4,
          num_seqs=4)


def test_split_kv_merge_reads_parts_in_chunks():
    """A lone decode token in a 1-token call with 8 KV heads: 33 parts (264 programs / 8), not a
    power of two, each of 2 blocks of 128 keys at a context of 8,448, so the merge reads its
    parts in two chunks (32, then 1)."""
    from jaxpaged.kernels.attention_tiles import choose_config

    assert choose_config(1, 1, 8, 8, 16, 8448 + 256)[0].num_splits == 33
    check([(8447, 1)], hq=8, hkv=8, d=16, bs=256, num_tokens=1, num_seqs=1)


def test_kv_parts_follow_the_live_sequences():
    """Split-KV parts from the step's live sequences: a lone row at 8k (128 blocks of 64
    keys, 8 KV heads, 264 programs) gets 32 parts (the cap), 4 rows get 8 each, 40 rows one;
    a 1k context stops at 4 parts of the 256-key minimum. The parts tile the range."""
    from jaxpaged.kernels.attention_tiles import kv_part, split_parts, work_slots

    def parts(live, lo, hi, cap=32):
        n = int(split_parts(live, 8, 264, cap))
        got = [tuple(int(x) for x in kv_part(lo, hi, sp, parts=n, min_blocks=4)) for sp in range(n)]
        spans = [(b0, b1) for b0, b1 in got if b1 > b0]
        assert [b for span in spans for b in range(*span)] == list(range(lo, hi))  # a tiling, in order
        return len(spans)

    assert [parts(1, 0, 128), parts(4, 0, 128), parts(40, 0, 128), parts(1, 0, 16), parts(1, 5, 5)] == \
        [32, 8, 1, 4, 0]
    assert parts(3, 3, 131) == 11  # 264 // 24 parts of ceil(128 / 11) = 12 blocks, the range offset by a window
    # the kernel's slots hold every live count's parts (3 or 11 rows: 33 slots)
    assert work_slots(16, 8, 264, 32) == max(n * int(split_parts(n, 8, 264, 32)) for n in range(1, 17)) == 33


def test_prompt_chunk_at_a_100k_context():
    """A 40-token chunk after 100,000 computed tokens (the per-q-block path) beside a decode row
    at 131,001 and a short prompt."""
    check([(100000, 40), (131000, 1), (7, 3)], hq=2, hkv=1, d=16, bs=256, num_tokens=48, num_seqs=4)


def test_all_padding_is_finite():
    """A batch whose sequences are all padding (seq_len 0) gives finite output."""
    q, k, v, qs, lens, bt = make_case(np.random.default_rng(3), [(5, 1)], hq=4, hkv=2, d=64, bs=16,
                                      num_tokens=8, num_seqs=4)
    qs, lens = jnp.zeros_like(qs), jnp.zeros_like(lens)
    out = paged_attention_gpu(q, k, v, 0, qs, lens, bt, scale=0.125)
    assert np.isfinite(np.asarray(out)).all()


def test_in_model_forward(tiny_model_dir):
    """Drop-in for the reference inside the model (layer under lax.scan, traced window)."""
    from jaxpaged.models import load_model, make_forward
    from jaxpaged.models.kv_cache import init_kv_cache
    from jaxpaged.models.step_input import make_step_input

    cfg, params = load_model(tiny_model_dir("llama"))
    bs = 4
    # a prefill of 6 tokens and a decode over 9 cached tokens
    inp = make_step_input([([1, 2, 3, 4, 5, 6], 0, [1, 2]), ([7], 9, [3, 4, 5])], bs, num_tokens=12,
                          num_seqs=3)
    rng = np.random.default_rng(0)
    kv0 = init_kv_cache(cfg, 8, bs, jnp.float32)
    kv0 = type(kv0)(jnp.asarray(rng.standard_normal(kv0.k.shape), jnp.float32),
                    jnp.asarray(rng.standard_normal(kv0.v.shape), jnp.float32))
    copy = lambda kv: type(kv)(jnp.array(kv.k), jnp.array(kv.v))  # noqa: E731 (inputs are donated)
    logits_ref, kv_ref = make_forward(cfg, paged_attention_ref)(params, copy(kv0), inp)
    logits, kv = make_forward(cfg, paged_attention_gpu)(params, copy(kv0), inp)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(logits_ref), atol=MODEL_TOL, rtol=MODEL_TOL)
    # block 0 is the scratch block of padding tokens, whose values are arbitrary
    np.testing.assert_allclose(np.asarray(kv.k)[:, :, 1:], np.asarray(kv_ref.k)[:, :, 1:], atol=MODEL_TOL,
                               rtol=MODEL_TOL)


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float8_e4m3fn"])
@pytest.mark.parametrize("mode,tokens", [("decode", 1), ("decode", 16), ("decode", 64), ("prefill", 256),
                                         ("split", 256), ("fused", 2048), ("short", 256)])
def test_triton_lowering_for_the_gpu(mode, tokens, kv_dtype):
    """Every mode's Triton lowering for a CUDA target, done here without a GPU, at Llama-3-8B's
    heads (32 q, 8 KV, D 128) with a bf16 and an fp8 pool: an op or block shape Triton refuses
    fails here. One Triton call per kernel launch ("split" launches two), and split-KV's merge."""
    from jaxpaged.kernels.attention_tiles import choose_config

    sd = jax.ShapeDtypeStruct
    s = min(tokens, 64)
    pool = sd((2, 8, 512, 16, 128), jnp.dtype(kv_dtype))
    scales = {} if kv_dtype == "bfloat16" else dict(k_scale=sd((2, 8), jnp.float32), v_scale=sd((2, 8), jnp.float32))
    args = (sd((tokens, 32, 128), jnp.bfloat16), pool, pool, sd((), jnp.int32), sd((s + 1,), jnp.int32),
            sd((s,), jnp.int32), sd((s, 256), jnp.int32))
    f = functools.partial(paged_attention_gpu, scale=0.088, mode=mode, interpret=False)
    hlo = jax.jit(f).trace(*args, **scales).lower(lowering_platforms=("cuda",)).as_text()
    merge = mode in ("decode", "split", "short") and choose_config(tokens, s, 32, 8, 128, 256 * 16)[0].num_splits > 1
    assert merge == (tokens <= 16)  # 16 rows x 8 KV heads leave SMs idle: split-KV
    assert hlo.count("custom_call @__gpu$xla.gpu.triton(") == (2 if mode == "split" else 1) + merge


@pytest.mark.slow
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (interpret mode is too slow for these sizes)")
@pytest.mark.parametrize("d,hq,hkv,bs,block_n", [(128, 32, 8, 16, None), (64, 16, 2, 32, None), (128, 8, 8, 16, None),
                                                  (128, 32, 8, 16, 128)])  # the tile of big decode batches
def test_gpu_randomized_bf16(d, hq, hkv, bs, block_n):
    rng = np.random.default_rng(d + hq + bs)
    plan = [(int(rng.integers(0, 2048)), 1) for _ in range(20)]
    plan += [(int(rng.integers(0, 1024)), int(rng.integers(1, 400))) for _ in range(4)]
    rng2 = np.random.default_rng(1)
    q, k, v, qs, lens, bt = make_case(rng2, plan, hq=hq, hkv=hkv, d=d, bs=bs, num_tokens=2048, num_seqs=32,
                                      dtype=np.float32)
    scale = d ** -0.5
    for window in (0, 300):
        ref = np.asarray(paged_attention_ref(q, k, v, 1, qs, lens, bt, scale=scale, sliding_window=window))
        bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
        out = paged_attention_gpu(bf(q), bf(k), bf(v), 1, qs, lens, bt, scale=scale, sliding_window=window,
                                  block_n=block_n)
        out = np.asarray(out.astype(jnp.float32))
        n = int(qs[-1])
        assert np.isfinite(out).all()
        err = np.linalg.norm(out[:n] - ref[:n]) / np.linalg.norm(ref[:n])
        assert err < 1e-2, err
