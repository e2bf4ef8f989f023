"""Exact rejection sampling of draft tokens (Leviathan et al. / Chen et al. 2023, vLLM V1's
`RejectionSampler`): a row's emitted tokens follow the target model's distribution whatever
the drafts are.

Per row with n drafts d_0..d_{n-1} and target distributions p_0..p_n (p_j: the target's next
token after the row's known tokens and d_0..d_{j-1}): draft j is accepted with probability
min(1, p_j(d_j) / q_j(d_j)); at the first rejection a token is sampled from
normalize(max(0, p_j - q_j)) and the row stops; when all n are accepted a bonus token is
sampled from p_n. A row thus emits 1..n+1 tokens. Greedy rows pass one-hot p (the argmax):
a draft is accepted iff it is the argmax, and the emitted token is always the argmax. Drafts
without probabilities (n-gram) have q one-hot on the draft, as vLLM treats them: accepted with
probability p_j(d_j), else a token from p_j with d_j removed, renormalized.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class RejectionOutput:
    token_ids: jax.Array  # [S, K + 1] i32: the emitted tokens, -1 after the last
    num_emitted: jax.Array  # [S] i32 in [1, num_draft_tokens + 1]
    num_accepted: jax.Array  # [S] i32: accepted drafts (num_emitted - 1)


def rejection_sample(target_probs: jax.Array, draft_token_ids: jax.Array, num_draft_tokens: jax.Array,
                     keys: jax.Array, draft_probs: jax.Array | None = None,
                     synthetic_acceptance_rate: float | None = None) -> RejectionOutput:
    """target_probs [S, K + 1, V] f32; draft_token_ids [S, K] i32 (entries at or past
    `num_draft_tokens` are ignored); num_draft_tokens [S] i32 in [0, K]; keys [S, 2] uint32
    threefry key data, one per row; draft_probs [S, K, V] f32 or None (q one-hot on the
    draft). `synthetic_acceptance_rate` (static; benchmarks): accept each draft with this
    probability whatever p and q. Straight-line code: no data-dependent control flow."""
    s, k1, v = target_probs.shape
    k = k1 - 1
    assert k >= 1, "at least one draft position"
    rows = jnp.arange(s)

    def draws(key):
        ku, kg = jax.random.split(key)
        return jax.random.uniform(ku, (k,), jnp.float32), jax.random.gumbel(kg, (v,), jnp.float32)

    u, gumbel = jax.vmap(draws)(jax.random.wrap_key_data(keys, impl="threefry2x32"))
    valid = jnp.arange(k)[None] < num_draft_tokens[:, None]
    drafts = jnp.where(valid, draft_token_ids, 0)
    p_draft = jnp.take_along_axis(target_probs[:, :k], drafts[..., None], axis=-1)[..., 0]
    if draft_probs is None:
        q_draft = jnp.ones_like(p_draft)
    else:
        q_draft = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
    if synthetic_acceptance_rate is None:
        accepted = u * q_draft < p_draft  # u < p / q, without dividing by q
    else:
        accepted = u < synthetic_acceptance_rate
    accepted &= valid
    num_accepted = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1)  # up to the first rejection
    p_last = target_probs[rows, num_accepted]  # [S, V]
    rejected = num_accepted < num_draft_tokens
    at = jnp.minimum(num_accepted, k - 1)
    if draft_probs is None:
        q_last = jax.nn.one_hot(drafts[rows, at], v, dtype=p_last.dtype)
    else:
        q_last = draft_probs[rows, at]
    residual = jnp.maximum(p_last - q_last, 0.0)
    # rounding can leave no residual mass where p and q are equal: fall back to p
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p_last)
    final_dist = jnp.where(rejected[:, None], residual, p_last)
    # Gumbel-max needs no normalization; log(0) = -inf never wins
    final = jnp.argmax(jnp.log(final_dist) + gumbel, axis=-1).astype(jnp.int32)
    pos = jnp.arange(k1)[None]
    padded = jnp.concatenate([drafts, jnp.zeros((s, 1), jnp.int32)], axis=1)
    n = num_accepted[:, None]
    tokens = jnp.where(pos < n, padded, jnp.where(pos == n, final[:, None], -1))
    return RejectionOutput(tokens, num_accepted + 1, num_accepted)


rejection_sample_jit = jax.jit(rejection_sample, static_argnames=("synthetic_acceptance_rate",))


def rejection_sample_reference(target_probs: np.ndarray, draft_token_ids: np.ndarray, num_draft_tokens: np.ndarray,
                               rng: np.random.Generator, draft_probs: np.ndarray | None = None) -> list[list[int]]:
    """The same rule, a row and a draft at a time, with numpy's generator: each row's emitted tokens."""
    out = []
    v = target_probs.shape[-1]
    for i in range(target_probs.shape[0]):
        emitted = []
        for j in range(int(num_draft_tokens[i])):
            d, p = int(draft_token_ids[i, j]), target_probs[i, j]
            q = np.eye(v)[d] if draft_probs is None else draft_probs[i, j]
            if rng.random() < min(1.0, p[d] / q[d]):
                emitted.append(d)
                continue
            residual = np.maximum(p - q, 0.0)
            emitted.append(int(rng.choice(v, p=residual / residual.sum())))
            break
        else:
            p = target_probs[i, len(emitted)]
            emitted.append(int(rng.choice(v, p=p / p.sum())))
        out.append(emitted)
    return out
