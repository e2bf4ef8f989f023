"""The step head of a speculating step (in place of the sampling head): target logits at each
row's k + 1 positions (its last known token and its drafts), the target distribution per row
(greedy: one-hot argmax; else temperature, min_p and, in the `filters` variant, top-k /
top-p), and `rejection_sample` over them; the fullest variant adds each row's logit bias to
its logits at every position (the raw logprobs are taken before, as in the sampler) and the
top-N raw logprobs at each position (as the sampling head's `logprobs` feature). Rows
without drafts get one token, as from the plain head. The host side (`verify_inputs`) packs
the positions and drafts; every shape is fixed by the token bucket and k (no recompile)."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.engine.host_buffer import unpack
from jaxpaged.engine.sample.sampler import GREEDY_EPS, SamplerOutput, SamplingInput, apply_logit_bias, filter_logits
from jaxpaged.engine.sample.features import SamplingFeatures
from jaxpaged.engine.sampling_params import MAX_LOGPROBS
from jaxpaged.engine.scheduler_output import ScheduledRequest
from jaxpaged.engine.spec_decode.rejection_sampler import rejection_sample
from jaxpaged.models import ModelConfig, family_module

_SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingInput))


def verify_kwargs(variant: SamplingFeatures) -> dict:
    """The verify head's static arguments for one of `VERIFY_VARIANTS`."""
    return {"filters": variant.top_k_top_p, "num_logprobs": MAX_LOGPROBS if variant.logprobs else 0}


def verify_inputs(rows: list[ScheduledRequest], query_start: np.ndarray, s: int, k: int) -> dict[str, np.ndarray]:
    """The verify head's extra inputs for `s` rows: `logits_index` [s * (k + 1)] (row i's
    position j: its last known token + j, clamped to its last token), `draft_ids` [s, k] and
    `num_drafts` [s]."""
    index = np.zeros((s, k + 1), np.int32)
    drafts = np.zeros((s, k), np.int32)
    num = np.zeros(s, np.int32)
    for i, r in enumerate(rows):
        d = len(r.draft_token_ids)
        end = int(query_start[i + 1])
        index[i] = np.minimum(end - 1 - d + np.arange(k + 1), end - 1)
        drafts[i, :d], num[i] = r.draft_token_ids, d
    return {"logits_index": index.reshape(-1), "draft_ids": drafts, "num_drafts": num}


def target_probs(logits: jax.Array, sp: SamplingInput, filters: bool) -> jax.Array:
    """[S, K + 1, V] logits -> the distribution each row samples from at each position: one-hot
    on the argmax for greedy rows, else the softmax of the temperature-scaled logits that the
    sampler's `filter_logits` keeps (min_p; top-k / top-p if `filters`, static)."""
    s, k1, v = logits.shape
    greedy = (sp.temperature < GREEDY_EPS)[:, None, None]
    x = logits / jnp.where(greedy, 1.0, sp.temperature[:, None, None])
    per_position = jax.tree.map(lambda f: jnp.repeat(f, k1, axis=0), sp)  # row i's fields for each position
    x = filter_logits(x.reshape(s * k1, v), per_position, filters).reshape(s, k1, v)
    one_hot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), v, dtype=jnp.float32)
    return jnp.where(greedy, one_hot, jax.nn.softmax(x, axis=-1))


def _verify_head(top_params, hidden, buf, *, layout, num_prev: int, filters: bool, num_logprobs: int,
                 cfg: ModelConfig, replicated, synthetic_acceptance_rate: float | None):
    """Returns (SamplerOutput of [K + 1, S] arrays: emitted ids (-1 after the last) with raw
    logprobs and ranks, and the top `num_logprobs` [K + 1, S, N] if any; num_emitted [S]; the
    last emitted ids padded to `num_prev`)."""
    a = unpack(buf, layout)
    sp = SamplingInput(**{f: a[f] for f in _SAMPLING_FIELDS})
    s, k = a["draft_ids"].shape
    logits = family_module(cfg).compute_logits(top_params, hidden[a["logits_index"]], cfg=cfg)
    logits = logits.astype(jnp.float32)
    raw = jax.nn.log_softmax(logits, axis=-1).reshape(s, k + 1, -1)
    if "bias_ids" in a:  # the logit_bias variant (its layout has the bias): each row's at all its positions
        logits = apply_logit_bias(logits, jnp.repeat(a["bias_ids"], k + 1, 0), jnp.repeat(a["bias_vals"], k + 1, 0))
    out = rejection_sample(target_probs(logits.reshape(s, k + 1, -1), sp, filters), a["draft_ids"], a["num_drafts"],
                           sp.keys, synthetic_acceptance_rate=synthetic_acceptance_rate)
    logprobs = jnp.take_along_axis(raw, jnp.maximum(out.token_ids, 0)[..., None], axis=-1)
    ranks = jnp.sum(raw >= logprobs, axis=-1, dtype=jnp.int32)
    last = out.token_ids[jnp.arange(s), out.num_emitted - 1]
    padded = jnp.zeros(num_prev, jnp.int32).at[:s].set(last[:num_prev])
    if replicated is not None:
        padded = jax.lax.with_sharding_constraint(padded, replicated)
    sampled = SamplerOutput(out.token_ids.T, logprobs[..., 0].T, ranks.T)
    if num_logprobs > 0:
        top_logprobs, top_ids = jax.lax.top_k(raw, num_logprobs)  # [S, K + 1, N]
        sampled = sampled.replace(top_ids=top_ids.astype(jnp.int32).transpose(1, 0, 2),
                                  top_logprobs=top_logprobs.transpose(1, 0, 2))
    return sampled, out.num_emitted, padded


@functools.cache
def jitted_verify(cfg: ModelConfig, replicated, synthetic_acceptance_rate: float | None):
    """The verify head per (model config, mesh, synthetic rate): one compile per token bucket
    and variant (`verify_kwargs`: top-k / top-p or not, top-N logprobs or not)."""
    return jax.jit(functools.partial(_verify_head, cfg=cfg, replicated=replicated,
                                     synthetic_acceptance_rate=synthetic_acceptance_rate),
                   static_argnames=("layout", "num_prev", "filters", "num_logprobs"))
