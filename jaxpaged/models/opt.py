"""OPT decoder as pure functions: learned positions (offset 2), LayerNorm, ReLU MLP, MHA."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxpaged.models.config import ModelConfig
from jaxpaged.models.hf_format import hf_transpose
from jaxpaged.models.kv_cache import KVCache
from jaxpaged.models.layers import embed, layer_norm, linear, lm_head, paged_attend
from jaxpaged.models.step_input import StepInput

POSITION_OFFSET = 2  # OPT's learned position table starts at index 2


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our param names and shapes; keys under `layers/` are per layer (one dict per layer)."""
    h, i, e = cfg.hidden_size, cfg.intermediate_size, cfg.word_embed_proj_dim
    shapes = {
        "embed": (cfg.vocab_size, e),
        "pos_embed": (cfg.max_position_embeddings + POSITION_OFFSET, h),
        "layers/attn_norm_w": (h,), "layers/attn_norm_b": (h,),
        "layers/wq": (h, h), "layers/wk": (h, h), "layers/wv": (h, h), "layers/wo": (h, h),
        "layers/mlp_norm_w": (h,), "layers/mlp_norm_b": (h,),
        "layers/w_fc1": (h, i), "layers/w_fc2": (i, h),
    }
    if cfg.qkv_bias:
        shapes |= {f"layers/b{n}": (h,) for n in "qkvo"} | {"layers/b_fc1": (i,), "layers/b_fc2": (h,)}
    if cfg.do_layer_norm_before:
        shapes |= {"final_norm_w": (h,), "final_norm_b": (h,)}
    if e != h:
        shapes |= {"project_in": (e, h), "project_out": (h, e)}
    return shapes


# The weights `quantization="fp8"` / `"int8"` / `"int4"` quantizes at load (not the embedding projections).
QUANTIZABLE = frozenset({"layers/wq", "layers/wk", "layers/wv", "layers/wo", "layers/w_fc1", "layers/w_fc2"})


def partition_specs(cfg: ModelConfig) -> dict[str, P]:
    """Tensor-parallel layout over mesh axis `tp`, key for key with `param_shapes`: q/k/v and
    fc1 column-parallel, out/fc2 row-parallel, the rest replicated."""
    specs = {k: P() for k in param_shapes(cfg)}
    specs |= {f"layers/w{n}": P(None, "tp") for n in "qkv"} | {f"layers/b{n}": P("tp") for n in "qkv"}
    specs |= {"layers/wo": P("tp"), "layers/w_fc1": P(None, "tp"), "layers/b_fc1": P("tp"), "layers/w_fc2": P("tp")}
    return {k: specs[k] for k in param_shapes(cfg)}


_HF_LAYER = {
    "attn_norm_w": "self_attn_layer_norm.weight", "attn_norm_b": "self_attn_layer_norm.bias",
    "mlp_norm_w": "final_layer_norm.weight", "mlp_norm_b": "final_layer_norm.bias",
    "wq": "self_attn.q_proj.weight", "bq": "self_attn.q_proj.bias",
    "wk": "self_attn.k_proj.weight", "bk": "self_attn.k_proj.bias",
    "wv": "self_attn.v_proj.weight", "bv": "self_attn.v_proj.bias",
    "wo": "self_attn.out_proj.weight", "bo": "self_attn.out_proj.bias",
    "w_fc1": "fc1.weight", "b_fc1": "fc1.bias", "w_fc2": "fc2.weight", "b_fc2": "fc2.bias",
}
_HF_TOP = {
    "embed": "model.decoder.embed_tokens.weight",
    "pos_embed": "model.decoder.embed_positions.weight",
    "final_norm_w": "model.decoder.final_layer_norm.weight",
    "final_norm_b": "model.decoder.final_layer_norm.bias",
    "project_in": "model.decoder.project_in.weight",
    "project_out": "model.decoder.project_out.weight",
}


def _hf_name(key: str, layer: int | None) -> str:
    if key.startswith("layers/"):
        return f"model.decoder.layers.{layer}.{_HF_LAYER[key.removeprefix('layers/')]}"
    return _HF_TOP[key]


def from_hf(cfg: ModelConfig, key: str, layer: int | None, get) -> jax.Array:
    """Our param `key` from HF tensors; `get(name)` returns one as stored in the checkpoint."""
    return hf_transpose(key, get(_hf_name(key, layer)))


def to_hf(cfg: ModelConfig, key: str, layer: int | None, value: np.ndarray) -> dict[str, np.ndarray]:
    """The HF tensor of our param `key` (the inverse of `from_hf`)."""
    return {_hf_name(key, layer): np.ascontiguousarray(hf_transpose(key, value))}


def forward(
    params: dict, kv: KVCache, inp: StepInput, cfg: ModelConfig, attention
) -> tuple[jax.Array, KVCache]:
    """One step over the ragged batch. Returns (hidden states [T, H] after the last layer, kv)."""
    x = embed(params["embed"], inp.token_ids)
    if "project_in" in params:
        x = linear(x, params["project_in"])
    x = x + embed(params["pos_embed"], inp.positions + POSITION_OFFSET)
    for i, lp in enumerate(params["layers"]):
        x, kv = _layer(lp, x, kv, jnp.int32(i), inp, cfg=cfg, attention=attention)
    return x, kv


@functools.partial(jax.jit, static_argnames=("cfg", "attention"))
def _layer(lp: dict, x: jax.Array, kv: KVCache, layer: jax.Array, inp: StepInput, *,
           cfg: ModelConfig, attention) -> tuple[jax.Array, KVCache]:
    """One decoder layer (pre- or post-LayerNorm); a nested jit as in `llama._layer`."""
    t = inp.token_ids.shape[0]
    nh, d, eps = cfg.num_heads, cfg.head_dim, cfg.norm_eps
    pre = cfg.do_layer_norm_before
    h = layer_norm(x, lp["attn_norm_w"], lp["attn_norm_b"], eps) if pre else x
    q = linear(h, lp["wq"], lp.get("bq")).reshape(t, nh, d)
    k = linear(h, lp["wk"], lp.get("bk")).reshape(t, nh, d)
    v = linear(h, lp["wv"], lp.get("bv")).reshape(t, nh, d)
    o, kv = paged_attend(q, k, v, kv, layer, inp, attention, cfg.attn_scale)
    x = x + linear(o, lp["wo"], lp.get("bo"))
    if not pre:
        x = layer_norm(x, lp["attn_norm_w"], lp["attn_norm_b"], eps)
    h = layer_norm(x, lp["mlp_norm_w"], lp["mlp_norm_b"], eps) if pre else x
    x = x + linear(jax.nn.relu(linear(h, lp["w_fc1"], lp.get("b_fc1"))), lp["w_fc2"], lp.get("b_fc2"))
    if not pre:
        x = layer_norm(x, lp["mlp_norm_w"], lp["mlp_norm_b"], eps)
    return x, kv


def compute_logits(params: dict, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """hidden: [N, H] rows of `forward`'s output -> float32 logits [N, V] (tied embedding head).
    Reads only top-level params."""
    h = hidden
    if cfg.do_layer_norm_before:
        h = layer_norm(h, params["final_norm_w"], params["final_norm_b"], cfg.norm_eps)
    if "project_out" in params:
        h = linear(h, params["project_out"])
    return lm_head(h, params, cfg.logits_scaling)
