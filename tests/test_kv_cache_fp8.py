"""fp8 KV cache (`kv_cache_dtype="fp8"`): the write (scale, saturation) and the three attentions
on fp8 pools against numpy; the model's logits against the float pool's (and a bfloat16
pool's, `kv_cache_dtype="bfloat16"`, against numpy's rounding); a checkpoint's k/v
scales (vLLM's names) loaded and applied as numpy says on HF transformers' K/V; tensor
parallelism; the engine's greedy tokens against HF's and its pool size."""
from __future__ import annotations

import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from _jaxprs import dot_generals
from _quant_checkpoints import decisive_copy, write_quantized
from safetensors.numpy import save_file
from test_paged_attention_kernel import F32_TOL, make_case
from test_paged_attention_ref import dense_attention

from jaxpaged.kernels.paged_attention import paged_attention_ref, write_kv
from jaxpaged.kernels.paged_attention_cpu import paged_attention_cpu
from jaxpaged.kernels.attention_tiles import TileConfig
from jaxpaged.kernels.paged_attention_gpu import paged_attention_gpu
from jaxpaged.models import ConfigError, load_config, load_model, make_forward
from jaxpaged.models.kv_cache import init_kv_cache, kv_bytes_per_block, kv_cache_dtype
from jaxpaged.models.quantization.kv_scales import load_kv_scales
from jaxpaged.models.step_input import make_step_input

FP8 = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}


def np_quantize(x: np.ndarray, scale, dtype) -> np.ndarray:
    """The oracle of the write: x / scale, clipped to the format's largest value, rounded."""
    big = float(ml_dtypes.finfo(dtype).max)
    return np.clip(x / scale, -big, big).astype(dtype)


@pytest.mark.parametrize("fmt", list(FP8))
def test_write_quantizes_with_the_layer_and_head_scale_and_saturates(fmt):
    rng = np.random.default_rng(0)
    pool = jnp.zeros((2, 2, 4, 4, 8), FP8[fmt])  # [L, Hkv, blocks, block size, D]
    k = (4 * rng.standard_normal((3, 2, 8))).astype(np.float32)
    k[1, 0, 3] = 1e6  # far beyond either format's range: saturates instead of becoming NaN / inf
    scales = jnp.asarray([[1.0, 1.0], [0.01, 0.5]], jnp.float32)  # [L, Hkv]
    slots = jnp.asarray([5, 6, 13], jnp.int32)
    kp, vp = write_kv(pool, pool, 1, k, k, slots, scales, scales)
    stored = np.asarray(kp)[1].reshape(2, 16, 8)[:, np.asarray(slots)].transpose(1, 0, 2)
    want = np_quantize(k, np.asarray(scales)[1][None, :, None], FP8[fmt])
    np.testing.assert_array_equal(stored.astype(np.float32), want.astype(np.float32))
    assert stored[1, 0, 3].astype(np.float32) == ml_dtypes.finfo(FP8[fmt]).max
    assert not np.asarray(kp)[0].astype(np.float32).any()  # layer 0 untouched


ATTENTIONS = {
    "ref": paged_attention_ref,
    "cpu": paged_attention_cpu,
    "pallas": paged_attention_gpu,  # Pallas interpret mode off the GPU: float8 refs load and convert there
    "pallas-split": functools.partial(paged_attention_gpu, decode_config=TileConfig(16, 64, num_splits=4,
                                                                                      min_split_keys=64)),
}
# (plan [(cached, new)], hq, hkv, window, T, S): a mixed batch (the fused launch), and decodes over
# long contexts (split-KV: the V scale must apply to every part before the merge)
CASES = {"ref": ([(37, 1), (6, 20), (0, 9)], 8, 2, 12, 40, 4), "cpu": ([(37, 1), (6, 20), (0, 9)], 8, 2, 12, 40, 4),
         "pallas": ([(37, 1), (6, 20), (0, 9)], 8, 2, 0, 40, 4),
         "pallas-split": ([(300, 1), (5, 1), (96, 1)], 8, 2, 0, 4, 4)}


@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_attention_on_fp8_pages_matches_numpy(attention):
    """Each attention on an e4m3 pool with per-(layer, head) scales equals numpy's dense
    attention over the pool's values times their scales (to 2e-5 on CPU; TF32 dots on a GPU)."""
    _check_fp8_attention(ATTENTIONS[attention], CASES[attention], jnp.float32, F32_TOL)


def test_pallas_on_fp8_pages_with_bf16_queries_matches_numpy():
    """bf16 queries on an e4m3 pool, the engine's case: the kernel's dots run in f16 (below);
    numpy's attention over the same bf16 queries, to the bf16 output's rounding."""
    _check_fp8_attention(ATTENTIONS["pallas"], CASES["pallas"], jnp.bfloat16, 1e-2)
    # queries beyond f16's range (65,504) against keys 1e-4 as large: finite, and still numpy's
    _check_fp8_attention(ATTENTIONS["pallas"], CASES["pallas"], jnp.bfloat16, 1e-2, q_mult=3e4, k_mult=1e-4)


def _check_fp8_attention(attention, case, q_dtype, tol, q_mult=1.0, k_mult=1.0):
    plan, hq, hkv, window, t, s = case
    d, bs, layer = 64, 16, 1
    rng = np.random.default_rng(1)
    q, k, v, qs, lens, bt = make_case(rng, plan, hq=hq, hkv=hkv, d=d, bs=bs, num_tokens=t, num_seqs=s)
    q, k = (q * q_mult).astype(q_dtype), k * k_mult
    scales = rng.uniform(0.02, 0.5, (2, 2, hkv)).astype(np.float32)  # [K/V, L, Hkv]
    scales[0] *= k_mult  # the same e4m3 values, k_mult times the keys
    pools = [np_quantize(np.asarray(x), sc[:, :, None, None, None], ml_dtypes.float8_e4m3fn)
             for x, sc in zip((k, v), scales)]
    out = jax.jit(functools.partial(attention, scale=0.125))(
        q, *map(jnp.asarray, pools), layer, qs, lens, bt, sliding_window=window, k_scale=jnp.asarray(scales[0]),
        v_scale=jnp.asarray(scales[1]))
    deq = [p[layer].astype(np.float32) * sc[layer][:, None, None, None] for p, sc in zip(pools, scales)]
    q, qs, bt = np.asarray(q, np.float32), np.asarray(qs), np.asarray(bt)
    for j, (c, n) in enumerate(plan):
        ctx = [x[:, bt[j]].reshape(hkv, -1, d)[:, :c + n].transpose(1, 0, 2) for x in deq]  # [ctx, Hkv, D]
        want = dense_attention(q[qs[j]:qs[j + 1]], *ctx, np.arange(c, c + n), 0.125, window)
        np.testing.assert_allclose(np.asarray(out, np.float32)[qs[j]:qs[j + 1]], want, atol=tol, rtol=tol)


@pytest.mark.parametrize("mode", ["decode", "fused"])
def test_fp8_pool_tiles_convert_to_f16_for_the_dots(mode):
    """The GPU kernel's dots over an e4m3 pool take f16 operands (Hopper converts e4m3 to f16 in
    one instruction, to bf16 through f32: 13-19% of a batch-256 decode, docs/kernels.md); over a
    bf16 pool they stay bf16."""
    sd = jax.ShapeDtypeStruct
    for pool_dtype, want in ((jnp.float8_e4m3fn, ("float16", "float16")), (jnp.bfloat16, ("bfloat16", "bfloat16"))):
        pool = sd((2, 8, 64, 16, 128), pool_dtype)
        fp8 = pool_dtype != jnp.bfloat16
        scales = dict(k_scale=sd((2, 8), jnp.float32), v_scale=sd((2, 8), jnp.float32)) if fp8 else {}
        args = (sd((4, 32, 128), jnp.bfloat16), pool, pool, sd((), jnp.int32), sd((5,), jnp.int32), sd((4,), jnp.int32),
                sd((4, 16), jnp.int32))
        f = functools.partial(paged_attention_gpu, scale=0.088, mode=mode, interpret=False)
        dots = dot_generals(jax.make_jaxpr(f)(*args, **scales).jaxpr)
        assert {tuple(str(x.aval.dtype) for x in eqn.invars) for eqn in dots} == {want}


@functools.cache
def _forward(cfg, attention):
    return make_forward(cfg, attention)  # one jit (and so one compile per pool dtype) for the tests here


def _prefill(cfg, params, kv, prompts, attention=paged_attention_cpu):
    """Logits at every prompt position ([len(prompts), n, V]) and the pool after one prefill."""
    n, bs = len(prompts[0]), 4
    nb = -(-n // bs)
    step = make_step_input([(p, 0, list(range(1 + nb * i, 1 + nb * (i + 1)))) for i, p in enumerate(prompts)], bs,
                           num_tokens=n * len(prompts), all_logits=True)
    logits, kv = _forward(cfg, attention)(params, kv, step)
    return np.asarray(logits).reshape(len(prompts), n, -1), kv


PROMPTS = [list(range(3 + 7 * i, 33 + 7 * i)) for i in range(4)]  # 4 x 30 tokens


@pytest.mark.parametrize("variant", ["llama", "opt"])
def test_fp8_kv_logits_stay_near_the_float_kv_logits(variant, tiny_model_dir):
    """Scales 1.0 (none in the checkpoint): the logits at 120 positions move by e4m3's rounding
    of K and V (measured relative error 3.2% llama, 1.4% opt); the argmax changes only where the
    float run's top two are within 0.05 (the tiny random model's logits have std ~0.4)."""
    cfg, params = load_model(tiny_model_dir(variant))
    blocks = 1 + 8 * len(PROMPTS)
    want, _ = _prefill(cfg, params, init_kv_cache(cfg, blocks, 4, jnp.float32), PROMPTS)
    kv = init_kv_cache(cfg, blocks, 4, jnp.float8_e4m3fn)
    got, kv = _prefill(cfg, params, kv, PROMPTS)
    assert kv.k.dtype == jnp.float8_e4m3fn and np.asarray(kv.k_scale).tolist() == [[1.0] * cfg.num_kv_heads] * 2
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.06
    top2 = np.sort(want, -1)[..., -2:]
    decisive = top2[..., 1] - top2[..., 0] > 0.05
    np.testing.assert_array_equal(got.argmax(-1)[decisive], want.argmax(-1)[decisive])


def test_bfloat16_kv_pool_holds_the_float_kv_rounded(tiny_model_dir):
    """`kv_cache_dtype="bfloat16"` on a float32 model: the pool is bf16 (half the bytes per
    token), layer 0's K and V are the float pool's rounded to bf16 (numpy's cast, ml_dtypes), and
    the logits move by bf16's rounding of K and V only (well under fp8's)."""
    cfg, params = load_model(tiny_model_dir("llama"))
    dtype = kv_cache_dtype("bfloat16", jnp.float32)
    assert dtype == jnp.bfloat16 and kv_cache_dtype("auto", jnp.float32) == jnp.float32
    blocks = 1 + 8 * len(PROMPTS)
    want, kv32 = _prefill(cfg, params, init_kv_cache(cfg, blocks, 4, jnp.float32), PROMPTS)
    got, kv16 = _prefill(cfg, params, init_kv_cache(cfg, blocks, 4, dtype), PROMPTS)
    assert kv16.k.dtype == jnp.bfloat16 and kv16.k_scale is None
    assert kv_bytes_per_block(cfg, 4, dtype) * 2 == kv_bytes_per_block(cfg, 4, jnp.float32)
    for pool16, pool32 in ((kv16.k, kv32.k), (kv16.v, kv32.v)):
        np.testing.assert_array_equal(np.asarray(pool16[0]), np.asarray(pool32[0]).astype(ml_dtypes.bfloat16))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.01
    top2 = np.sort(want, -1)[..., -2:]
    decisive = top2[..., 1] - top2[..., 0] > 0.01
    np.testing.assert_array_equal(got.argmax(-1)[decisive], want.argmax(-1)[decisive])


def with_kv_scales(src, out, k_scale: np.ndarray, v_scale: np.ndarray, modelopt: bool = False):
    """`src` plus KV-cache scales per layer (`k_scale[i]`: [] per tensor or [Hkv] per head) under
    compressed-tensors' names (`self_attn.k_scale`) or ModelOpt's (`self_attn.k_proj.k_scale`)."""
    shutil.copytree(src, out)
    assert not (out / "model.safetensors.index.json").exists()  # one more file is found by listing them
    k_name, v_name = ("k_proj.k_scale", "v_proj.v_scale") if modelopt else ("k_scale", "v_scale")
    tensors = {}
    for i, (ks, vs) in enumerate(zip(k_scale, v_scale)):
        tensors[f"model.layers.{i}.self_attn.{k_name}"] = np.asarray(ks, np.float32)
        tensors[f"model.layers.{i}.self_attn.{v_name}"] = np.asarray(vs, np.float32)
    save_file(tensors, out / "model-kv-scales.safetensors", metadata={"format": "pt"})
    return out


def test_checkpoint_layouts_give_their_kv_scales(tiny_model_dir, tmp_path):
    """compressed-tensors (a static FP8 checkpoint with a `kv_cache_scheme`) and ModelOpt (with
    `kv_cache_quant_algo: FP8`) scales, per tensor and per head, replicated with their KV head
    over a 4-way mesh; the weights still load; a bad scale is a one-line error naming it."""
    src = tiny_model_dir("llama")
    ct, _ = write_quantized(src, tmp_path, "ct-fp8-static")
    cfg = json.loads((ct / "config.json").read_text())
    cfg["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                     "dynamic": False, "symmetric": True}
    (ct / "config.json").write_text(json.dumps(cfg))
    ct = with_kv_scales(ct, tmp_path / "ct-kv", [0.5, 0.25], [0.125, [2.0, 4.0]])
    mo, _ = write_quantized(src, tmp_path, "modelopt-fp8")
    hq = json.loads((mo / "hf_quant_config.json").read_text())
    hq["quantization"]["kv_cache_quant_algo"] = "FP8"
    (mo / "hf_quant_config.json").write_text(json.dumps(hq))
    mo = with_kv_scales(mo, tmp_path / "mo-kv", [[0.5, 1.5], 0.25], [0.125, 3.0], modelopt=True)
    for model, k, v in [(ct, [[0.5, 0.5], [0.25, 0.25]], [[0.125, 0.125], [2.0, 4.0]]),
                        (mo, [[0.5, 1.5], [0.25, 0.25]], [[0.125, 0.125], [3.0, 3.0]])]:
        cfg = load_config(model)
        scales = load_kv_scales(model, cfg)
        assert scales.from_checkpoint and scales.k.tolist() == k and scales.v.tolist() == v
        cfg4 = dataclasses.replace(cfg, num_kv_heads=4, kv_head_replicas=2)  # as split_config makes it for tp=4
        assert load_kv_scales(model, cfg4).v.tolist() == [[x for x in row for _ in (0, 1)] for row in v]
    none = load_kv_scales(src, cfg)
    assert not none.from_checkpoint and none.k.tolist() == [[1.0, 1.0]] * 2
    bad = with_kv_scales(src, tmp_path / "bad", [0.5, [1.0, 2.0, 3.0]], [0.5, 0.5])
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.self_attn\.k_scale has shape \(3,\)"):
        load_kv_scales(bad, cfg)


def hf_kv(model_dir, prompt: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """HF transformers' cache after `prompt`: per layer (K, V) [Hkv, n, D], RoPE applied to K."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        cache = hf(ids, attention_mask=torch.ones_like(ids), use_cache=True).past_key_values
    return [(layer.keys[0].numpy(), layer.values[0].numpy()) for layer in cache.layers]


def test_checkpoint_scales_quantize_the_pool_as_numpy_says(tiny_model_dir, tmp_path):
    """Per-head scales from the checkpoint that saturate many of head 0's values (|x| > 448 x
    0.0002) and leave head 1's alone: the pool's layer 0 holds numpy's e4m3(clip(x / scale)) of
    HF's K and V (one e4m3 step of slack where float rounding differs); without the scales the
    logits would be those of the unsaturated pool."""
    src = tiny_model_dir("llama")
    k_scale = v_scale = [[0.0002, 0.01], [0.0002, 0.01]]
    model = with_kv_scales(src, tmp_path / "kv", k_scale, v_scale)
    cfg, params = load_model(model)
    scales = load_kv_scales(model, cfg)
    kv = init_kv_cache(cfg, 1 + 8 * len(PROMPTS), 4, jnp.float8_e4m3fn, k_scale=scales.k, v_scale=scales.v)
    got, kv = _prefill(cfg, params, kv, PROMPTS)
    prompt = PROMPTS[0]
    n = len(prompt)
    want_k, want_v = hf_kv(src, prompt)[0]
    for pool, want in ((kv.k, want_k), (kv.v, want_v)):
        stored = np.asarray(pool)[0, :, 1:1 + -(-n // 4)].reshape(cfg.num_kv_heads, -1, cfg.head_dim)[:, :n]
        stored = stored.astype(np.float32) * np.asarray(k_scale[0], np.float32)[:, None, None]
        oracle = np_quantize(want, np.asarray(k_scale[0], np.float32)[:, None, None], ml_dtypes.float8_e4m3fn)
        oracle = oracle.astype(np.float32) * np.asarray(k_scale[0], np.float32)[:, None, None]
        saturated = np.abs(want[0]) > 1.1 * 448 * 0.0002
        assert saturated.mean() > 0.3  # the scale matters for head 0
        np.testing.assert_array_equal(stored[0][saturated], oracle[0][saturated])
        np.testing.assert_allclose(stored, oracle, rtol=2 ** -3, atol=2 ** -9 * 0.01)
    unscaled, _ = _prefill(cfg, params, init_kv_cache(cfg, 1 + 8 * len(PROMPTS), 4, jnp.float8_e4m3fn), PROMPTS)
    assert np.abs(got - unscaled).max() > 0.05  # saturation changed the result


def test_fp8_pool_and_scales_shard_over_kv_heads(tiny_model_dir, tmp_path):
    """On a 4-device mesh each of the 2 KV heads is replicated twice, its pool part and its
    scale with it (per-head scales that differ, so a mix-up would show): one device's logits."""
    from jax.sharding import NamedSharding

    from jaxpaged.engine.mesh import make_mesh, shard_attention
    from jaxpaged.models.sharding import KV_POOL

    model = with_kv_scales(tiny_model_dir("llama"), tmp_path / "kv", [[0.0002, 0.01]] * 2, [[0.01, 0.0002]] * 2)
    cfg, params = load_model(model)
    scales = load_kv_scales(model, cfg)
    kv = init_kv_cache(cfg, 1 + 8 * len(PROMPTS), 4, jnp.float8_e4m3fn, k_scale=scales.k, v_scale=scales.v)
    want, _ = _prefill(cfg, params, kv, PROMPTS, paged_attention_ref)
    mesh = make_mesh(4)
    cfg4, sharded = load_model(model, mesh=mesh)
    scales = load_kv_scales(model, cfg4)
    kv = init_kv_cache(cfg4, 1 + 8 * len(PROMPTS), 4, jnp.float8_e4m3fn, NamedSharding(mesh, KV_POOL),
                       scales.k, scales.v)
    assert kv.k_scale.addressable_shards[0].data.shape == (2, 1)
    got, _ = _prefill(cfg4, sharded, kv, PROMPTS, shard_attention(paged_attention_ref, mesh))
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_engine_fp8_kv_greedy_and_pool_size(tiny_model_dir, tmp_path):
    """`LLM(kv_cache_dtype="fp8")`: greedy tokens against HF's (float) on 16 prompts of the tiny
    model whose next token is decided by a margin (`decisive_copy`), the pool in e4m3 with one
    byte per value (4x the float32 model's tokens in the same bytes), its dtype reported as
    /v1/models does."""
    from jaxpaged import LLM, SamplingParams

    model = str(decisive_copy(tiny_model_dir("llama"), tmp_path / "decisive"))
    budget = 1 << 15  # binds before the seats' contexts do (8 x 64 tokens: 128 blocks)
    llm = LLM(model, kv_cache_dtype="fp8", max_model_len=64, block_size=4, max_num_seqs=8,
              max_num_batched_tokens=32, token_buckets=(32,), cpu_kv_cache_bytes=budget)
    cfg = llm.engine.core.model_config
    assert llm.engine.core.info.kv_cache_dtype == llm.engine.startup["kv_cache_dtype"] == "float8_e4m3fn"
    blocks = llm.engine.startup["num_kv_blocks"]
    assert blocks == budget // kv_bytes_per_block(cfg, 4, jnp.float8_e4m3fn) == 4 * (
        budget // kv_bytes_per_block(cfg, 4, jnp.float32))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 500, int(rng.integers(5, 30))).tolist() for _ in range(16)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    gen = transformers.GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    same = 0
    for p, o in zip(prompts, outs):
        ids = torch.tensor([p])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)[0, len(p):].tolist()
        same += o.outputs[0].token_ids == ref
    assert same >= 13, same  # 14 of 16 on jax 0.10.2 (docs/quantization.md)
