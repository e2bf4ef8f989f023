"""Runs one scheduled step on the device: pads the batch to a bucket, calls the jitted
forward + sampler (KV pool donated), and hands the sampled ids back as numpy.

Three compiled variants (`MODES`) per token bucket: `greedy` (argmax and the chosen token's
raw logprob), `sample` (temperature, top-k/p, min-p, seeds) and `full` (adds penalties over
the token history, top-N logprobs, prompt logprobs, logit bias, min_tokens), each used only
when the scheduled requests need it. `launch` only dispatches: the
engine builds and launches step n+1 while step n still runs, feeding back the tokens
step n samples on the device (see `_step`).
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpaged.engine.sampler import SamplerOutput, make_history, make_sampling_input, row_key, sample
from jaxpaged.engine.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_STOP_TOKEN_IDS

from jaxpaged.engine.scheduler import SchedulerOutput
from jaxpaged.engine.sequence import PENDING, Sequence
from jaxpaged.models import ModelConfig, family_module
from jaxpaged.models.kv_cache import KVCache
from jaxpaged.models.step_input import make_step_input


@struct.dataclass
class FullInput:
    """Extra inputs of the `full` variant."""
    history: jax.Array  # [S, H] i32 prompt + output ids, -1 padded (penalties)
    history_is_output: jax.Array  # [S, H] bool
    prompt_next: jax.Array  # [T] i32 next prompt token per token (prompt logprobs), -1 = none
    bias_ids: jax.Array  # [S, B] i32 logit_bias / banned ids, -1 padded
    bias_vals: jax.Array  # [S, B] f32 (-inf bans: EOS and stop ids before min_tokens)


@struct.dataclass
class PromptLogprobsOutput:
    logprobs: jax.Array  # [T] raw logprob of `prompt_next`
    ranks: jax.Array  # [T]
    top_ids: jax.Array  # [T, K]
    top_logprobs: jax.Array  # [T, K]


@dataclasses.dataclass
class Launched:
    """A dispatched step; its outputs stay on the device until `ModelRunner.fetch`."""
    rows: list[tuple[Sequence, int, int, bool]]  # (sequence, first new position, new tokens, samples)
    sampled: SamplerOutput  # row i belongs to rows[i]
    prompt: PromptLogprobsOutput | None
    token_offsets: np.ndarray  # [S+1] where each row's tokens start in T


def token_buckets(max_num_batched_tokens: int, smallest: int = 16) -> list[int]:
    """Powers of two from `smallest` up to the budget, and the budget itself."""
    out, b = [], min(smallest, max_num_batched_tokens)
    while b < max_num_batched_tokens:
        out.append(b)
        b *= 2
    return out + [max_num_batched_tokens]


_traces = [0]  # step traces in this process: a trace is a compile


def num_step_compiles() -> int:
    """How many times any engine's step function was traced (and so compiled)."""
    return _traces[0]


@functools.cache
def _jitted_step(cfg: ModelConfig, attention, replicated):
    """One jitted step per (model config, kernel, mesh), shared by engines: same shapes, no
    recompile. `replicated` (a sharding over the mesh, or None) pins the fed-back token ids."""
    return jax.jit(functools.partial(_step, cfg=cfg, attention=attention, replicated=replicated),
                   donate_argnums=1, static_argnames="greedy_only")


MODES = ("greedy", "sample", "full")


def _step(params, kv: KVCache, inp, sp, full_inp, prev_tokens, feedback, *, cfg: ModelConfig, attention,
          replicated, greedy_only: bool):
    """forward + sample; traced once per (bucket, variant, pool shape).

    Tokens whose value the host has not seen yet (sampled by the previous step, still on the
    device) come from `prev_tokens[feedback[t]]` (feedback -1 = use `inp.token_ids[t]`).
    Returns (sampled, prompt logprobs or None, the sampled ids padded to max_num_seqs, kv).
    """
    _traces[0] += 1
    forward = family_module(cfg).forward
    tokens = jnp.where(feedback >= 0, prev_tokens[jnp.maximum(feedback, 0)], inp.token_ids)
    inp = inp.replace(token_ids=tokens)
    if full_inp is None:
        logits, kv = forward(params, kv, inp, cfg, attention)
        out = sample(logits, sp, greedy_only=greedy_only)
        return out, None, _pad(out.token_ids, prev_tokens.shape[0], replicated), kv
    t = inp.token_ids.shape[0]
    logits_all, kv = forward(params, kv, inp.replace(logits_index=jnp.arange(t, dtype=jnp.int32)), cfg, attention)
    out = sample(logits_all[inp.logits_index], sp, full_inp.history, full_inp.history_is_output, MAX_LOGPROBS,
                 (full_inp.bias_ids, full_inp.bias_vals))
    raw = jax.nn.log_softmax(logits_all, axis=-1)
    lp = jnp.take_along_axis(raw, jnp.maximum(full_inp.prompt_next, 0)[:, None], axis=-1)
    top_lp, top_ids = jax.lax.top_k(raw, MAX_LOGPROBS)
    prompt = PromptLogprobsOutput(lp[:, 0], jnp.sum(raw >= lp, axis=-1, dtype=jnp.int32), top_ids, top_lp)
    return out, prompt, _pad(out.token_ids, prev_tokens.shape[0], replicated), kv


def _pad(tokens: jax.Array, n: int, sharding) -> jax.Array:
    """The sampled ids padded to `n`, with the same sharding as the first step's input."""
    padded = jnp.zeros(n, jnp.int32).at[: tokens.shape[0]].set(tokens)
    return padded if sharding is None else jax.lax.with_sharding_constraint(padded, sharding)


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params: dict, kv: KVCache, attention, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, eos_token_ids: tuple[int, ...], mesh=None):
        self.cfg, self.params, self.kv = cfg, params, kv
        self.eos_token_ids = eos_token_ids
        self.bias_width = MAX_LOGIT_BIAS + MAX_STOP_TOKEN_IDS + len(eos_token_ids)  # min_tokens bans EOS too
        self.block_size = kv.block_size
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // self.block_size)
        self.buckets = token_buckets(max_num_batched_tokens)
        replicated = NamedSharding(mesh, P()) if mesh is not None else None
        self._step = _jitted_step(cfg, attention, replicated)
        # the last step's sampled ids; committed like the step's outputs, so no second compile
        zeros = np.zeros(max_num_seqs, np.int32)
        self._prev_tokens = (jax.device_put(zeros, jax.devices()[0]) if replicated is None
                             else jax.make_array_from_callback(zeros.shape, replicated, lambda i: zeros[i]))
        self.device_wait_seconds = 0.0  # host blocked on the device (dispatch + fetch)

    def warmup(self) -> None:
        """Compile every (bucket, variant) on an all-padding batch (it writes only scratch)."""
        for t in self.buckets:
            for mode in MODES:
                self.fetch(self._launch([], [], t, mode))

    @staticmethod
    def step_mode(sched: SchedulerOutput) -> str:
        """The cheapest variant (of `MODES`) that serves every scheduled request."""
        if any(seq.params.needs_full_step for seq, _ in sched.scheduled):
            return "full"
        return "greedy" if all(seq.params.greedy for seq, _ in sched.scheduled) else "sample"

    def launch(self, sched: SchedulerOutput, mode: str) -> Launched:
        """Build the padded inputs on the host and dispatch the step in variant `mode` (does
        not wait for it)."""
        t = next(b for b in self.buckets if b >= sched.num_tokens)
        return self._launch(sched.scheduled, sched.block_tables, t, mode)

    def _launch(self, scheduled, block_tables, t: int, mode: str) -> Launched:
        s = min(t, self.max_num_seqs)
        seqs, keys, rows = [], [], []
        feedback = np.full(t, -1, np.int32)
        offset = 0
        for (seq, n), table in zip(scheduled, block_tables):
            start = seq.num_computed_tokens
            new = seq.all_token_ids[start:start + n]
            if new[-1] == PENDING:  # sampled by the previous step: read it on the device
                feedback[offset + n - 1] = seq.sample_row
            seqs.append((new, start, table))
            keys.append(row_key(seq.seed, len(seq.output_token_ids)))
            rows.append((seq, start, n, start + n == seq.num_tokens))
            offset += n
        inp = make_step_input(seqs, self.block_size, t, s, self.max_blocks)
        sp = make_sampling_input([seq.params for seq, _ in scheduled], keys, s)
        full_inp = self._full_input(scheduled, t, s) if mode == "full" else None
        t0 = time.perf_counter()
        out, prompt, self._prev_tokens, self.kv = self._step(
            self.params, self.kv, inp, sp, full_inp, self._prev_tokens, feedback, greedy_only=mode == "greedy")
        self.device_wait_seconds += time.perf_counter() - t0
        return Launched(rows, out, prompt, inp.query_start)

    def fetch(self, launched: Launched) -> Launched:
        """Wait for a launched step and copy its outputs to the host."""
        t0 = time.perf_counter()
        sampled, prompt = jax.device_get((launched.sampled, launched.prompt))
        self.device_wait_seconds += time.perf_counter() - t0
        return dataclasses.replace(launched, sampled=sampled, prompt=prompt)

    def _full_input(self, scheduled, t: int, s: int) -> FullInput:
        hist, is_out = make_history([(seq.prompt_token_ids, seq.output_token_ids) for seq, _ in scheduled],
                                    s, self.max_model_len)
        nxt = np.full(t, -1, np.int32)
        i = 0
        for seq, n in scheduled:
            if seq.params.prompt_logprobs is not None:
                pos = np.arange(seq.num_computed_tokens, seq.num_computed_tokens + n)
                ok = pos + 1 < seq.num_prompt_tokens
                nxt[i:i + n][ok] = np.asarray(seq.prompt_token_ids)[pos[ok] + 1]
            i += n
        bias_ids = np.full((s, self.bias_width), -1, np.int32)
        bias_vals = np.zeros((s, self.bias_width), np.float32)
        for row, (seq, _) in enumerate(scheduled):
            p = seq.params
            entries = list(p.logit_bias.items())
            if len(seq.output_token_ids) < p.min_tokens:
                entries += [(t, -np.inf) for t in (*self.eos_token_ids, *p.stop_token_ids)]
            if entries:
                bias_ids[row, :len(entries)], bias_vals[row, :len(entries)] = zip(*entries)
        return FullInput(hist, is_out, nxt, bias_ids, bias_vals)
