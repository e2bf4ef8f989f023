"""The step's jitted programs, pure functions of device arrays (the host side is
`model_runner.py`): the **forward** (the model over the packed step inputs, KV pool donated:
the heavy compile, one per token bucket and `max_query_len` hint) and the **head** (final
norm, LM head and sampler: small, one per bucket and sampling variant, `sample.features`).

With multi-step decode a third program, the **decode loop**, runs K forward + head
iterations of an all-decode step in one call (one per decode bucket and history-free variant).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from jaxpaged.engine.host_buffer import unpack
from jaxpaged.engine.sample.features import SamplingFeatures
from jaxpaged.engine.sample.sampler import SamplerOutput, SamplingInput, sample
from jaxpaged.engine.sampling_params import MAX_LOGPROBS
from jaxpaged.models import ModelConfig, family_module
from jaxpaged.models.kv_cache import KVCache
from jaxpaged.models.step_input import StepInput


@struct.dataclass
class PromptLogprobsOutput:
    logprobs: jax.Array  # [T] raw logprob of `prompt_next`
    ranks: jax.Array  # [T]
    top_ids: jax.Array  # [T, K]
    top_logprobs: jax.Array  # [T, K]


_traces = [0]  # traces of the step's programs in this process: a trace is a compile


def num_step_compiles() -> int:
    """How many times any engine's step programs were traced (and so compiled)."""
    return _traces[0]


# rows of the `full` head's prompt logprobs computed at once (f32 [rows, V] logits each)
PROMPT_LOGPROBS_ROWS = 2048


_SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingInput))
_STEP_FIELDS = tuple(f.name for f in dataclasses.fields(StepInput) if f.name != "logits_index")


def _fed_back_input(a: dict, prev_tokens, attention, max_query_len) -> tuple[StepInput, object]:
    """The StepInput of the unpacked fields `a`, and `attention` with its launch hint.

    Tokens whose value the host has not seen yet (sampled by the previous step, still on the
    device) come from `prev_tokens[feedback[t]]` (feedback -1 = use the host's token id).
    `max_query_len` (None or `DECODE_ONLY_MAX_TOKENS`) tells the attention kernel whether every
    sequence has few new tokens (decode steps take a faster launch)."""
    feedback = a["feedback"]
    tokens = jnp.where(feedback >= 0, prev_tokens[jnp.maximum(feedback, 0)], a["token_ids"])
    inp = StepInput(**{f: a[f] for f in _STEP_FIELDS}, logits_index=None).replace(token_ids=tokens)
    if max_query_len is not None:
        attention = functools.partial(attention, max_query_len=max_query_len)
    return inp, attention


def _sample(logits, sp: SamplingInput, a: dict, variant: SamplingFeatures) -> SamplerOutput:
    """Sample with the features of `variant`, reading their inputs from the unpacked `a`."""
    return sample(logits, sp,
                  a.get("history"), a.get("history_is_output"),
                  MAX_LOGPROBS if variant.logprobs else 0,
                  (a["bias_ids"], a["bias_vals"]) if variant.logit_bias else None,
                  greedy_only=not variant.random, filters=variant.top_k_top_p,
                  token_bitmask=a.get("token_bitmask"))


def _padded_ids(ids, num_prev: int, replicated):
    """Sampled ids padded to `num_prev` rows for the next step's feedback; under a mesh with the
    sharding of the first step's input (no second compile)."""
    padded = jnp.zeros(num_prev, jnp.int32).at[: ids.shape[0]].set(ids[:num_prev])
    return padded if replicated is None else jax.lax.with_sharding_constraint(padded, replicated)


def _forward(params, kv: KVCache, buf, prev_tokens, *, layout, max_query_len, cfg: ModelConfig, attention):
    """The model over the packed StepInput (`_fed_back_input`); traced once per (token bucket,
    `max_query_len`): the heavy compile. The head program picks the sampled rows.
    Returns (hidden [T, H], kv).
    """
    _traces[0] += 1
    inp, attention = _fed_back_input(unpack(buf, layout), prev_tokens, attention, max_query_len)
    return family_module(cfg).forward(params, kv, inp, cfg, attention)


def _head(top_params, hidden, buf, *, layout, variant: SamplingFeatures, num_prev: int, cfg: ModelConfig,
          replicated):
    """LM head + sampler over the packed sampling inputs; traced once per (bucket, variant),
    small. Returns (sampled, prompt logprobs or None, the sampled ids padded to `num_prev`)."""
    _traces[0] += 1
    a = unpack(buf, layout)
    sp = SamplingInput(**{k: a[k] for k in _SAMPLING_FIELDS})
    logits_of = functools.partial(family_module(cfg).compute_logits, top_params, cfg=cfg)
    out = _sample(logits_of(hidden[a["logits_index"]]), sp, a, variant)
    prompt = _prompt_logprobs(logits_of, hidden, a["prompt_next"]) if variant.prompt_logprobs else None
    return out, prompt, _padded_ids(out.token_ids, num_prev, replicated)


def _prompt_logprobs(logits_of, hidden, next_ids) -> PromptLogprobsOutput:
    """Every row's logprob of its next prompt token (`next_ids` [T], -1 = none), its rank and
    the top `MAX_LOGPROBS`, `PROMPT_LOGPROBS_ROWS` rows at a time: the f32 [T, V] logits of a
    whole bucket would be 8 GB at T = 16384 for a 128k vocabulary (and the head's memory is
    kept free beside the KV pool)."""
    def row(args):
        raw = jax.nn.log_softmax(logits_of(args[0][None])[0])
        lp = raw[jnp.maximum(args[1], 0)]
        top_lp, top_ids = jax.lax.top_k(raw, MAX_LOGPROBS)
        return lp, jnp.sum(raw >= lp, dtype=jnp.int32), top_ids, top_lp

    rows = min(PROMPT_LOGPROBS_ROWS, hidden.shape[0])
    return PromptLogprobsOutput(*jax.lax.map(row, (hidden, next_ids), batch_size=rows))


def _decode_loop(params, kv: KVCache, buf, prev_tokens, *, layout, max_query_len, variant: SamplingFeatures,
                 num_steps: int, num_prev: int, cfg: ModelConfig, attention, replicated):
    """`num_steps` (K) decode iterations of forward + head in one program (multi-step decode:
    one dispatch instead of K). Row i is token i (T == S); iteration j feeds each row the
    token it sampled in iteration j - 1, at position + j, its KV written to the slot its
    block table gives (the scheduler reserved the blocks). A row past its `steps` (max_tokens
    reached) writes to the scratch block instead. A static-bound `fori_loop`: one compile, and
    XLA's GPU while loop with a known trip count reads no predicate on the host.
    Returns (SamplerOutput of [K, S] arrays, kv, each row's last sampled id padded to `num_prev`)."""
    _traces[0] += 1
    a = unpack(buf, layout)
    steps, keys = a["steps"], a["keys"]  # [S], [K, S, 2]
    sp = SamplingInput(**{k: a[k] for k in _SAMPLING_FIELDS} | {"keys": keys[0]})
    inp, attention = _fed_back_input(a, prev_tokens, attention, max_query_len)
    model = family_module(cfg)
    t, bs = inp.token_ids.shape[0], kv.block_size
    rows, scratch = jnp.arange(t), jnp.arange(t, dtype=jnp.int32) % bs  # scratch: as padding tokens

    def iteration(j, carry):
        kv, tokens, out = carry
        valid = j < steps
        pos = inp.positions + j
        block = inp.block_tables[rows, jnp.minimum(pos // bs, inp.block_tables.shape[1] - 1)]
        step = inp.replace(token_ids=tokens, positions=pos, slot_mapping=jnp.where(valid, block * bs + pos % bs, scratch),
                           seq_lens=jnp.where(valid, inp.seq_lens + j, inp.seq_lens))
        hidden, kv = model.forward(params, kv, step, cfg, attention)
        new = _sample(model.compute_logits(params, hidden, cfg), sp.replace(keys=keys[j]), a, variant)
        out = jax.tree.map(lambda o, x: o.at[j].set(x), out, new)
        return kv, new.token_ids, out

    out = SamplerOutput(jnp.zeros((num_steps, t), jnp.int32), jnp.zeros((num_steps, t), jnp.float32),
                        jnp.zeros((num_steps, t), jnp.int32))
    kv, _, out = jax.lax.fori_loop(0, num_steps, iteration, (kv, inp.token_ids, out))
    return out, kv, _padded_ids(out.token_ids[jnp.maximum(steps - 1, 0), rows], num_prev, replicated)


# The forward of the token buckets above a full decode batch (their steps carry prompt chunks:
# compute-bound GEMMs) is compiled with cuBLAS GEMMs only, 1-2% faster there on an H200 than
# XLA's Triton GEMMs (docs/decisions.md). GPU only.
PREFILL_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


@dataclasses.dataclass(frozen=True)
class StepPrograms:
    """The jitted programs of one (model config, kernel, mesh)."""
    forward: object  # (params, kv, buf, prev_tokens; layout, max_query_len) -> (hidden, kv); kv donated
    forward_prefill: object  # the same, compiled with PREFILL_COMPILER_OPTIONS
    head: object  # (top_params, hidden, buf; layout, variant, num_prev) -> (sampled, prompt, prev_tokens)
    decode_loop: object  # (params, kv, buf, prev_tokens; ...) -> (sampled [K, S], kv, prev_tokens); kv donated


@functools.cache
def jitted_step(cfg: ModelConfig, attention, replicated, kv_sharding) -> StepPrograms:
    """The step's programs per (model config, kernel, mesh), shared by engines (same shapes,
    no recompile): the forward (KV pool donated) and its prefill twin (same function, compiled
    with `PREFILL_COMPILER_OPTIONS`), the head + sampler, and the decode loop (KV pool
    donated). `replicated` (a sharding over the mesh, or None) pins the forward's hidden
    states and the fed-back token ids, so the heads can be compiled before the forward
    (`Warmup.compile_heads`)."""
    forward = dict(donate_argnums=1, static_argnames=("layout", "max_query_len"),
                   out_shardings=None if replicated is None else (replicated, kv_sharding))
    fwd = jax.jit(functools.partial(_forward, cfg=cfg, attention=attention), **forward)
    # a distinct function object: jax's trace and compile caches stay per program
    fwd_prefill = jax.jit(functools.partial(_forward, cfg=cfg, attention=attention), **forward,
                          compiler_options=PREFILL_COMPILER_OPTIONS if jax.default_backend() == "gpu" else None)
    head = jax.jit(functools.partial(_head, cfg=cfg, replicated=replicated),
                   static_argnames=("layout", "variant", "num_prev"))
    loop = jax.jit(functools.partial(_decode_loop, cfg=cfg, attention=attention, replicated=replicated),
                   donate_argnums=1, out_shardings=None if replicated is None else (replicated, kv_sharding, replicated),
                   static_argnames=("layout", "max_query_len", "variant", "num_steps", "num_prev"))
    return StepPrograms(fwd, fwd_prefill, head, loop)
