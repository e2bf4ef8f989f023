"""Llama-family decoder as pure functions: Llama 2/3/3.1, Mistral, Qwen2, Qwen3, Granite.

Params are a dict of arrays with `params["layers"]` a list of per-layer dicts; the layer loop
is unrolled (see docs/architecture.md: stacked weights under `lax.scan` read every weight
twice on the GPU). Weights are stored `[in, *out]` for `layers.linear`: no transpose.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxpaged.models.config import ModelConfig
from jaxpaged.models.hf_format import hf_transpose
from jaxpaged.models.kv_cache import KVCache
from jaxpaged.models.layers import apply_rope, embed, linear, lm_head, paged_attend, rms_norm, rms_norm_for, swiglu
from jaxpaged.models.quantization import fuse_out
from jaxpaged.models.step_input import StepInput


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our param names and shapes; keys under `layers/` are per layer (one dict per layer)."""
    h, i, d, hkv = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_kv_heads
    qkv = (hkv, cfg.num_heads // hkv + 2, d)  # per KV head: its query heads, then its K and V
    shapes = {
        "embed": (cfg.vocab_size, h),
        "final_norm": (h,),
        "layers/attn_norm": (h,),
        "layers/wqkv": (h, *qkv),
        "layers/wo": (cfg.num_heads * d, h),
        "layers/mlp_norm": (h,),
        "layers/w_gate_up": (h, 2, i),
        "layers/w_down": (i, h),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (h, cfg.vocab_size)
    if cfg.qkv_bias:
        shapes["layers/bqkv"] = qkv
    if cfg.o_bias:
        shapes["layers/bo"] = (h,)
    if cfg.mlp_bias:
        shapes |= {"layers/b_gate_up": (2, i), "layers/b_down": (h,)}
    if cfg.qk_norm:
        shapes |= {"layers/q_norm": (cfg.head_dim,), "layers/k_norm": (cfg.head_dim,)}
    return shapes


# The weights `quantization="fp8"` / `"int8"` / `"int4"` quantizes at load (the LM head stays, as in vLLM).
QUANTIZABLE = frozenset({"layers/wqkv", "layers/wo", "layers/w_gate_up", "layers/w_down"})


def partition_specs(cfg: ModelConfig) -> dict[str, P]:
    """Tensor-parallel layout over mesh axis `tp`, key for key with `param_shapes`: q/k/v and
    gate/up column-parallel (KV-head and intermediate axes), o/down row-parallel, the LM head
    vocab-parallel, the rest replicated."""
    specs = {k: P() for k in param_shapes(cfg)}
    specs |= {"layers/wqkv": P(None, "tp"), "layers/bqkv": P("tp"), "layers/wo": P("tp"),
              "layers/w_gate_up": P(None, None, "tp"), "layers/b_gate_up": P(None, "tp"),
              "layers/w_down": P("tp"), "lm_head": P(None, "tp")}
    return {k: specs[k] for k in param_shapes(cfg)}


_HF_LAYER = {
    "attn_norm": "input_layernorm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "wo": "self_attn.o_proj.weight", "bo": "self_attn.o_proj.bias",
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
    "w_down": "mlp.down_proj.weight", "b_down": "mlp.down_proj.bias",
}
# Fused params: one GEMM instead of three (q, k, v) or two (gate, up) reads the weights
# faster in small-batch decode; HF keeps them apart.
_HF_FUSED = {
    "wqkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "bqkv": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "w_gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "b_gate_up": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
}
_HF_TOP = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}


def _hf_names(key: str, layer: int | None) -> tuple[str, ...]:
    """HF tensor names that make our param `key` (of layer `layer` for `layers/` keys)."""
    if not key.startswith("layers/"):
        return (_HF_TOP[key],)
    name = key.removeprefix("layers/")
    return tuple(f"model.layers.{layer}.{n}" for n in _HF_FUSED.get(name, (_HF_LAYER.get(name),)))


def from_hf(cfg: ModelConfig, key: str, layer: int | None, get) -> jax.Array:
    """Our param `key` from HF tensors; `get(name)` returns one as stored in the checkpoint."""
    parts = [hf_transpose(key, get(n)) for n in _hf_names(key, layer)]
    if key.endswith("qkv"):  # [..., heads * D] each -> [..., Hkv, G + 2, D]
        hkv = cfg.num_kv_heads // cfg.kv_head_replicas
        return fuse_out(parts, lambda ps: _replicate_kv_heads(jnp.concatenate(
            [p.reshape(*p.shape[:-1], hkv, -1, cfg.head_dim) for p in ps], -2), cfg.kv_head_replicas))
    if key.endswith("gate_up"):
        return fuse_out(parts, lambda ps: jnp.stack(ps, axis=-2))
    return parts[0]


def _replicate_kv_heads(qkv: jax.Array, r: int) -> jax.Array:
    """[..., Hkv, G + 2, D] -> [..., Hkv * r, G / r + 2, D]: copy j*r + i of KV head j keeps
    its query heads i*G/r .. (i+1)*G/r, so the flat query-head order (and `wo`) is unchanged."""
    if r == 1:
        return qkv
    *lead, hkv, g2, d = qkv.shape
    g = g2 - 2
    q = qkv[..., :g, :].reshape(*lead, hkv, r, g // r, d)
    kv = jnp.broadcast_to(qkv[..., None, g:, :], (*lead, hkv, r, 2, d))
    return jnp.concatenate([q, kv], -2).reshape(*lead, hkv * r, g // r + 2, d)


def to_hf(cfg: ModelConfig, key: str, layer: int | None, value: np.ndarray) -> dict[str, np.ndarray]:
    """The HF tensors of our param `key` (the inverse of `from_hf`)."""
    names = _hf_names(key, layer)
    if key.endswith("qkv"):
        g = cfg.num_heads // cfg.num_kv_heads
        lead = value.shape[:-3]
        parts = [value[..., :g, :], value[..., g:g + 1, :], value[..., g + 1:, :]]
        parts = [p.reshape(*lead, -1) for p in parts]
    elif key.endswith("gate_up"):
        parts = [value[..., 0, :], value[..., 1, :]]
    else:
        parts = [value]
    return {n: np.ascontiguousarray(hf_transpose(key, p)) for n, p in zip(names, parts)}


def forward(
    params: dict, kv: KVCache, inp: StepInput, cfg: ModelConfig, attention
) -> tuple[jax.Array, KVCache]:
    """One step over the ragged batch. Returns (hidden states [T, H] after the last layer, kv);
    `compute_logits` turns the rows that are sampled into logits (a separate, small program).

    `attention` has the signature of `kernels.paged_attention.paged_attention_ref` (or a GPU
    kernel with the same one); the new K/V are written to the pool before it is called.
    """
    x = embed(params["embed"], inp.token_ids, cfg.embedding_multiplier)
    for i, lp in enumerate(params["layers"]):
        x, kv = _layer(lp, x, kv, jnp.int32(i), inp, cfg=cfg, attention=attention, window=cfg.sliding_windows[i])
    return x, kv


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "window"))
def _layer(lp: dict, x: jax.Array, kv: KVCache, layer: jax.Array, inp: StepInput, *,
           cfg: ModelConfig, attention, window: int) -> tuple[jax.Array, KVCache]:
    """One decoder layer; x: [T, H]. A nested jit: traced and lowered once per step shape
    instead of once per layer (start-up time); XLA inlines it, so the step stays unrolled."""
    t = inp.token_ids.shape[0]
    hq, d = cfg.num_heads, cfg.head_dim
    g = hq // cfg.num_kv_heads
    h = rms_norm_for(x, lp["attn_norm"], cfg.norm_eps, lp["wqkv"])
    qkv = linear(h, lp["wqkv"], lp.get("bqkv"))  # [T, Hkv, G + 2, D]
    q, k, v = qkv[:, :, :g].reshape(t, hq, d), qkv[:, :, g], qkv[:, :, g + 1]
    if cfg.qk_norm:
        q, k = rms_norm(q, lp["q_norm"], cfg.norm_eps), rms_norm(k, lp["k_norm"], cfg.norm_eps)
    inv_freq = jnp.asarray(cfg.rope_inv_freq())
    q, k = apply_rope(q, inp.positions, inv_freq), apply_rope(k, inp.positions, inv_freq)
    o, kv = paged_attend(q, k, v, kv, layer, inp, attention, cfg.attn_scale, window)
    x = x + linear(o, lp["wo"], lp.get("bo")) * cfg.residual_multiplier
    h = rms_norm_for(x, lp["mlp_norm"], cfg.norm_eps, lp["w_gate_up"])
    x = x + swiglu(h, lp["w_gate_up"], lp["w_down"], lp.get("b_gate_up"), lp.get("b_down")) * cfg.residual_multiplier
    return x, kv


def compute_logits(params: dict, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """hidden: [N, H] rows of `forward`'s output -> float32 logits [N, V] (final norm, LM head).
    Reads only top-level params."""
    return lm_head(rms_norm(hidden, params["final_norm"], cfg.norm_eps), params, cfg.logits_scaling)
