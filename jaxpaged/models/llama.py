"""Llama-family decoder as pure functions: Llama 2/3/3.1, Mistral, Qwen2, Qwen3, Granite.

Params are a dict of arrays with `params["layers"]` a list of per-layer dicts; the layer loop
is unrolled (see docs/architecture.md: stacked weights under `lax.scan` read every weight
twice on the GPU). Linear weights are stored `[in, out]` so `x @ w` needs no transpose.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpaged.models.config import ModelConfig
from jaxpaged.models.kv_cache import KVCache
from jaxpaged.models.layers import apply_rope, linear, paged_attend, rms_norm
from jaxpaged.models.step_input import StepInput


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our param names and shapes; keys under `layers/` are per layer (one dict per layer)."""
    h, q, kv, i = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    shapes = {
        "embed": (cfg.vocab_size, h),
        "final_norm": (h,),
        "layers/attn_norm": (h,),
        "layers/wq": (h, q),
        "layers/wk": (h, kv),
        "layers/wv": (h, kv),
        "layers/wo": (q, h),
        "layers/mlp_norm": (h,),
        "layers/w_gate": (h, i),
        "layers/w_up": (h, i),
        "layers/w_down": (i, h),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (h, cfg.vocab_size)
    if cfg.qkv_bias:
        shapes |= {"layers/bq": (q,), "layers/bk": (kv,), "layers/bv": (kv,)}
    if cfg.o_bias:
        shapes["layers/bo"] = (h,)
    if cfg.mlp_bias:
        shapes |= {"layers/b_gate": (i,), "layers/b_up": (i,), "layers/b_down": (h,)}
    if cfg.qk_norm:
        shapes |= {"layers/q_norm": (cfg.head_dim,), "layers/k_norm": (cfg.head_dim,)}
    return shapes


_HF_LAYER = {
    "attn_norm": "input_layernorm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "wq": "self_attn.q_proj.weight", "bq": "self_attn.q_proj.bias",
    "wk": "self_attn.k_proj.weight", "bk": "self_attn.k_proj.bias",
    "wv": "self_attn.v_proj.weight", "bv": "self_attn.v_proj.bias",
    "wo": "self_attn.o_proj.weight", "bo": "self_attn.o_proj.bias",
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
    "w_gate": "mlp.gate_proj.weight", "b_gate": "mlp.gate_proj.bias",
    "w_up": "mlp.up_proj.weight", "b_up": "mlp.up_proj.bias",
    "w_down": "mlp.down_proj.weight", "b_down": "mlp.down_proj.bias",
}
_HF_TOP = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}


def hf_name(key: str, layer: int | None) -> str:
    """HF tensor name of our param `key` (of layer `layer` for `layers/` keys)."""
    if key.startswith("layers/"):
        return f"model.layers.{layer}.{_HF_LAYER[key.removeprefix('layers/')]}"
    return _HF_TOP[key]


def forward(
    params: dict, kv: KVCache, inp: StepInput, cfg: ModelConfig, attention
) -> tuple[jax.Array, KVCache]:
    """One step over the ragged batch. Returns (float32 logits [N, V] at `logits_index`, kv).

    `attention` has the signature of `kernels.paged_attention.paged_attention_ref` (or a GPU
    kernel with the same one); the new K/V are written to the pool before it is called.
    """
    t = inp.token_ids.shape[0]
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    inv_freq = jnp.asarray(cfg.rope_inv_freq())
    x = params["embed"][inp.token_ids] * jnp.asarray(cfg.embedding_multiplier, params["embed"].dtype)
    k_all, v_all = kv.k, kv.v
    for i, lp in enumerate(params["layers"]):
        h = rms_norm(x, lp["attn_norm"], cfg.norm_eps)
        q = linear(h, lp, "wq", "bq").reshape(t, hq, d)
        k = linear(h, lp, "wk", "bk").reshape(t, hkv, d)
        v = linear(h, lp, "wv", "bv").reshape(t, hkv, d)
        if cfg.qk_norm:
            q, k = rms_norm(q, lp["q_norm"], cfg.norm_eps), rms_norm(k, lp["k_norm"], cfg.norm_eps)
        q, k = apply_rope(q, inp.positions, inv_freq), apply_rope(k, inp.positions, inv_freq)
        o, k_all, v_all = paged_attend(q, k, v, k_all, v_all, i, inp, attention, cfg.attn_scale,
                                       cfg.sliding_windows[i])
        x = x + linear(o, lp, "wo", "bo") * cfg.residual_multiplier
        h = rms_norm(x, lp["mlp_norm"], cfg.norm_eps)
        gate, up = linear(h, lp, "w_gate", "b_gate"), linear(h, lp, "w_up", "b_up")
        x = x + linear(jax.nn.silu(gate) * up, lp, "w_down", "b_down") * cfg.residual_multiplier
    h = rms_norm(x[inp.logits_index], params["final_norm"], cfg.norm_eps)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    logits = (h @ head).astype(jnp.float32) / cfg.logits_scaling
    return logits, KVCache(k_all, v_all)
