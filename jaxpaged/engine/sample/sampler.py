"""On-device sampling fused into the jitted engine step, with vLLM semantics.

Per row: penalties -> temperature -> min_p -> top_k -> top_p -> Gumbel-max sample. Greedy
rows (temperature 0) take the argmax of the penalized logits. The returned logprob, rank
and top logprobs are always of the raw model distribution (vLLM V1's `raw_logprobs`).
All shapes are fixed; padding rows are greedy with every filter and penalty off.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxpaged.engine.sample.topk_topp import top_k_top_p_threshold

GREEDY_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)
_OFF = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}
_M64 = (1 << 64) - 1


@struct.dataclass
class SamplingInput:
    temperature: jax.Array  # [S] f32, < GREEDY_EPS = greedy
    top_k: jax.Array  # [S] i32, <= 0 or >= V = off
    top_p: jax.Array  # [S] f32, 1 = off
    min_p: jax.Array  # [S] f32, 0 = off
    presence_penalty: jax.Array  # [S] f32, 0 = off
    frequency_penalty: jax.Array  # [S] f32, 0 = off
    repetition_penalty: jax.Array  # [S] f32, 1 = off
    keys: jax.Array  # [S, 2] uint32 threefry key data, from `row_keys`


@struct.dataclass
class SamplerOutput:
    token_ids: jax.Array  # [S] i32
    logprobs: jax.Array  # [S] f32, raw logprob of the sampled token
    ranks: jax.Array  # [S] i32, rank of the sampled token in the raw distribution (1 = top)
    top_ids: jax.Array | None = None  # [S, K] i32, only when num_logprobs = K > 0
    top_logprobs: jax.Array | None = None  # [S, K] f32


# ---------------------------------------------------------------- host (numpy) helpers


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of uint64 values (a bijective 64-bit mix; numpy uint64 arithmetic wraps)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_keys(seeds: Sequence[int], steps: Sequence[int]) -> np.ndarray:
    """Key data [N, 2] uint32: row i's key for the token after `steps[i]` generated ones of a
    request seeded `seeds[i]`.

    A pure host hash of (seed, step): the same request step draws the same token whatever
    batch or row it is in (or how many decode iterations its step runs), and making keys
    costs no device work or compile.
    """
    seed = np.array([s & _M64 for s in seeds], np.uint64)
    x = _mix64(_mix64(seed) ^ np.asarray(steps, np.int64).astype(np.uint64))
    return np.stack([x >> np.uint64(32), x & np.uint64(0xFFFFFFFF)], axis=-1).astype(np.uint32)


def make_sampling_input(
    params: Sequence[Any], keys: Sequence[np.ndarray], num_seqs: int | None = None
) -> SamplingInput:
    """Padded numpy SamplingInput for `num_seqs` rows (default `len(params)`).

    `params[i]` is a mapping or an object (e.g. a vLLM-style SamplingParams) with any of the
    SamplingInput field names; missing or None fields are off (temperature defaults to 1).
    `keys[i]` is the row's key (`row_keys`). Padding rows are greedy with everything off.
    """
    s = num_seqs or len(params)
    assert s >= len(params) == len(keys)
    cols = {name: np.full(s, off, np.int32 if name == "top_k" else np.float32) for name, off in _OFF.items()}
    cols["temperature"][:] = 0.0
    mappings = [p if isinstance(p, Mapping) else None for p in params]
    for name, col in cols.items():  # a column at a time: one numpy assignment each
        vals = [m.get(name) if m is not None else getattr(p, name, None) for p, m in zip(params, mappings)]
        col[:len(params)] = [_OFF[name] if v is None else v for v in vals]
    key_data = np.zeros((s, 2), np.uint32)
    key_data[: len(keys)] = np.asarray(keys, np.uint32).reshape(-1, 2)
    return SamplingInput(**cols, keys=key_data)


class TokenHistory(NamedTuple):
    token_ids: np.ndarray  # [S, H] i32, prompt then output ids, padded with -1
    is_output: np.ndarray  # [S, H] bool, generated (vs prompt) token


def make_history(
    seqs: Sequence[tuple[Sequence[int], Sequence[int]]],
    num_seqs: int | None = None,
    length: int | None = None,
) -> TokenHistory:
    """The penalties' token history from per-request `(prompt_ids, output_ids)`, padded to
    `num_seqs` rows; H = `length` or the longest history."""
    s = num_seqs or len(seqs)
    h = length or max((len(p) + len(o) for p, o in seqs), default=1)
    history = np.full((s, h), -1, np.int32)
    is_output = np.zeros((s, h), bool)
    for i, (prompt, output) in enumerate(seqs):
        n, m = len(prompt), len(output)
        assert n + m <= h, f"history of {n + m} tokens does not fit length {h}"
        history[i, : n + m] = np.concatenate([np.asarray(prompt, np.int32), np.asarray(output, np.int32)])
        is_output[i, n : n + m] = True
    return TokenHistory(history, is_output)


# ---------------------------------------------------------------- device (jnp)


def apply_penalties(
    logits: jax.Array, sp: SamplingInput, history: jax.Array, history_is_output: jax.Array
) -> jax.Array:
    """vLLM repetition, frequency and presence penalties.

    logits: [S, V] f32; history: [S, H] i32 token ids padded with -1; history_is_output:
    [S, H] bool (generated vs prompt token) -> [S, V] f32. Repetition applies to tokens seen
    in prompt or output; frequency and presence to output tokens only.
    """
    s, v = logits.shape
    rows = jnp.arange(s)[:, None]
    idx = jnp.where(history < 0, v, history)  # -1 would wrap around; out of range is dropped
    out_counts = jnp.zeros((s, v), jnp.int32).at[rows, idx].add(history_is_output.astype(jnp.int32), mode="drop")
    seen = jnp.zeros((s, v), bool).at[rows, idx].set(True, mode="drop")
    rp = jnp.where(seen, sp.repetition_penalty[:, None], 1.0)
    logits = jnp.where(logits > 0, logits / rp, logits * rp)
    logits = logits - sp.frequency_penalty[:, None] * out_counts
    return logits - sp.presence_penalty[:, None] * (out_counts > 0)


def filter_logits(x: jax.Array, sp: SamplingInput, filters: bool) -> jax.Array:
    """Temperature-scaled logits x: [S, V] with the tokens min_p cuts, then (if `filters`)
    those top_k and top_p cut, at -inf: what a sampled row draws from."""
    v = x.shape[-1]
    x = jnp.where(x >= x.max(-1, keepdims=True) + jnp.log(sp.min_p)[:, None], x, -jnp.inf)
    if filters:
        top_k = jnp.where((sp.top_k <= 0) | (sp.top_k >= v), v, sp.top_k)
        x = jnp.where(x >= top_k_top_p_threshold(x, top_k, sp.top_p), x, -jnp.inf)
    return x


def _sample_random(x: jax.Array, sp: SamplingInput, filters: bool) -> jax.Array:
    """Gumbel-max over `filter_logits` of temperature-scaled logits x: [S, V] -> [S] i32."""
    v = x.shape[-1]
    x = filter_logits(x, sp, filters)
    keys = jax.random.wrap_key_data(sp.keys, impl="threefry2x32")
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (v,), jnp.float32))(keys)
    return jnp.argmax(x + gumbel, axis=-1).astype(jnp.int32)


def apply_logit_bias(logits: jax.Array, ids: jax.Array, vals: jax.Array) -> jax.Array:
    """logits [S, V] + the bias entries: ids [S, B] i32 (padded with -1), vals [S, B] f32."""
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, jnp.where(ids < 0, logits.shape[1], ids)].add(vals, mode="drop")


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """Ban the tokens whose bit is 0. logits: [S, V]; bitmask: [S, ceil(V / 32)] int32, bit
    `v % 32` of word `v // 32` set = token v allowed (xgrammar's layout)."""
    v = logits.shape[-1]
    ids = jnp.arange(v)
    allowed = (bitmask[:, ids // 32] >> (ids % 32)) & 1
    return jnp.where(allowed != 0, logits, -jnp.inf)


def sample(
    logits: jax.Array,
    sp: SamplingInput,
    history: jax.Array | None = None,
    history_is_output: jax.Array | None = None,
    num_logprobs: int = 0,
    bias: tuple[jax.Array, jax.Array] | None = None,
    greedy_only: bool = False,
    filters: bool = True,
    token_bitmask: jax.Array | None = None,
) -> SamplerOutput:
    """Sample one token per row. logits: [S, V]; history / history_is_output: [S, H] or None
    (None skips penalties: a separate, cheaper compile); num_logprobs: static K; bias:
    optional `(ids [S, B] i32 padded with -1, values [S, B] f32)` added to the logits after
    the raw logprobs are taken (logit_bias; -inf bans a token, as min_tokens does for EOS);
    greedy_only (static): every row is greedy, so no random path is traced; filters (static):
    False when no row uses top_k / top_p, so their threshold (two 32-step bisections) is not
    traced and those fields are ignored; token_bitmask: optional [S, ceil(V / 32)] int32 of
    allowed tokens (`apply_token_bitmask`), applied after bias and penalties.

    Straight-line code, no `lax.cond` or loop: XLA on GPU reads a conditional's predicate on
    the host, which would block the dispatching thread until the step's forward is done (no
    host / device overlap). So the random path is always computed and greedy rows are picked
    per row, and top_k / top_p use a fixed bisection instead of a data-dependent skip."""
    logits = logits.astype(jnp.float32)
    raw = jax.nn.log_softmax(logits, axis=-1)
    if bias is not None:
        logits = apply_logit_bias(logits, *bias)
    if history is not None:
        logits = apply_penalties(logits, sp, history, history_is_output)
    if token_bitmask is not None:
        logits = apply_token_bitmask(logits, token_bitmask)
    greedy = sp.temperature < GREEDY_EPS
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy_only:
        tokens = argmax
    else:
        scaled = logits / jnp.where(greedy, 1.0, sp.temperature)[:, None]
        tokens = jnp.where(greedy, argmax, _sample_random(scaled, sp, filters))
    logprob = jnp.take_along_axis(raw, tokens[:, None], axis=-1)
    ranks = jnp.sum(raw >= logprob, axis=-1, dtype=jnp.int32)
    out = SamplerOutput(tokens, logprob[:, 0], ranks)
    if num_logprobs > 0:
        top_logprobs, top_ids = jax.lax.top_k(raw, num_logprobs)
        out = out.replace(top_ids=top_ids.astype(jnp.int32), top_logprobs=top_logprobs)
    return out
