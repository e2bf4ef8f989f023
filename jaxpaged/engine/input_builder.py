"""The host side of a step: the scheduled rows padded to a token bucket and packed into the
step programs' int32 buffers (`host_buffer.py`: one host-to-device transfer per program),
with the sampling inputs its head variant reads."""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxpaged.engine.host_buffer import Layout, field_view, pack
from jaxpaged.engine.sample.features import SamplingFeatures
from jaxpaged.engine.sample.sampler import make_history, make_sampling_input, row_keys
from jaxpaged.engine.sample.token_mask import TokenBitmaskJob, num_words
from jaxpaged.engine.sampling_params import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS
from jaxpaged.engine.scheduler_output import ScheduledRequest, SchedulerOutput
from jaxpaged.engine.spec_decode.verify import verify_inputs
from jaxpaged.kernels.attention_tiles import DECODE_ONLY_MAX_TOKENS
from jaxpaged.models.step_input import SeqChunk, make_step_input


@dataclasses.dataclass
class StepInputs:
    """A step packed for the runner. `step`: the forward's inputs, with the attention launch
    hint `max_query_len` (`DECODE_ONLY_MAX_TOKENS` when every row has that few new tokens, else
    None); `sampling`: the head's (None for the multi-step decode loop, whose one buffer holds
    both); `query_start` [S + 1]: where each row's tokens start."""
    step: np.ndarray
    step_layout: Layout
    max_query_len: int | None
    sampling: np.ndarray | None
    sampling_layout: Layout | None
    query_start: np.ndarray
    late: LateSampling | None = None  # `build(late=True)`: the sampling inputs, finished later


@dataclasses.dataclass
class LateSampling:
    """A step's sampling inputs without those read from the requests' histories: the engine
    finishes them (`InputBuilder.finish_sampling`) once the steps before it are processed."""
    sampling: dict[str, np.ndarray]
    rows: list[ScheduledRequest]
    variant: SamplingFeatures
    num_tokens: int  # t
    num_seqs: int  # s


@dataclasses.dataclass
class LateHeadInputs:
    """A late step's packed sampling inputs (`InputBuilder.finish_sampling`) whose allowed-token
    bitmask is still to fill: `fill` writes it into the buffer, on the runner's worker just
    before the head's dispatch, while the engine thread goes on (grammar fills are the slow
    part of a structured-output step's host work)."""
    buf: np.ndarray
    layout: Layout
    bitmask: TokenBitmaskJob | None

    def fill(self) -> tuple[np.ndarray, Layout]:
        if self.bitmask is not None:
            self.bitmask.run(field_view(self.buf, self.layout, "token_bitmask"))
        return self.buf, self.layout


def _fields(x) -> dict:
    return {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}


class InputBuilder:
    """Packs scheduled steps for `ModelRunner`; `short_query_buckets` get the decode launch
    hint when every query is short, and `num_steps` > 1 builds multi-step decode inputs."""

    def __init__(self, block_size: int, max_num_seqs: int, max_model_len: int, eos_token_ids: tuple[int, ...],
                 vocab_size: int, short_query_buckets: list[int], num_steps: int = 1, num_spec: int = 0):
        self.block_size, self.max_num_seqs, self.max_model_len = block_size, max_num_seqs, max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.eos_token_ids, self.vocab_size = eos_token_ids, vocab_size
        self.bias_width = MAX_LOGIT_BIAS + MAX_STOP_TOKEN_IDS + len(eos_token_ids)  # min_tokens bans EOS too
        self.short_query_buckets, self.num_steps = short_query_buckets, num_steps
        self.num_spec = num_spec  # speculative decoding: draft tokens per row (k) of the verify head

    def build(self, sched: SchedulerOutput, t: int, variant: SamplingFeatures,
              speculative: bool = False, late: bool = False) -> StepInputs:
        """The step padded to `t` tokens (and min(t, max_num_seqs) rows), with the sampling
        inputs of head `variant` (of the verify head when `speculative`). A multi-step step packs
        one buffer for t rows, with the sampling keys of every iteration. `late`: the sampling
        inputs are left to `finish_sampling` (`StepInputs.late`)."""
        rows = sched.scheduled
        s = t if sched.multi_step else min(t, self.max_num_seqs)
        feedback = np.full(t, -1, np.int32)  # token -> row of the previous step's sampled ids
        seqs, offset = [], 0
        for r in rows:
            n = r.num_new_tokens - len(r.draft_token_ids)  # the request's own tokens, then its drafts
            feedback[offset + n - 1] = r.request.fed_back_row(r.start + n)
            seqs.append(SeqChunk(r.request.all_token_ids[r.start:r.start + n] + r.draft_token_ids, r.start,
                                 r.block_table))
            offset += r.num_new_tokens
        inp = _fields(make_step_input(seqs, self.block_size, t, s, self.max_blocks))
        # keys [K, rows, 2] (K = 1 unless multi-step): iteration j draws the token after done + j
        k = self.num_steps if sched.multi_step else 1
        done = [r.request.num_output_tokens for r in rows]
        keys = row_keys([r.request.seed for r in rows] * k, [d + j for j in range(k) for d in done])
        keys = keys.reshape(k, len(rows), 2)
        sampling = {"logits_index": inp.pop("logits_index"),
                    **_fields(make_sampling_input([r.request.params for r in rows], keys[0], s))}
        longest = max((r.num_new_tokens for r in rows), default=0)
        short = t in self.short_query_buckets and longest <= DECODE_ONLY_MAX_TOKENS
        max_query_len = DECODE_ONLY_MAX_TOKENS if short else None
        if late:
            return StepInputs(*pack(inp | {"feedback": feedback}), max_query_len, None, None, inp["query_start"],
                              LateSampling(sampling, rows, variant, t, s))
        history, bitmask = self._history_inputs(rows, variant, t, s)
        sampling |= history | ({"token_bitmask": bitmask.run()} if bitmask else {})
        if speculative:  # the verify head's positions and drafts (spec_decode/verify.py)
            sampling |= verify_inputs(rows, inp["query_start"], s, self.num_spec)
        if sched.multi_step:
            sampling["keys"] = np.zeros((k, s, 2), np.uint32)
            sampling["keys"][:, :len(rows)] = keys
            sampling["steps"] = np.zeros(s, np.int32)
            sampling["steps"][:len(rows)] = [r.num_sampled for r in rows]
            buf, layout = pack(inp | {"feedback": feedback} | sampling)
            return StepInputs(buf, layout, max_query_len, None, None, inp["query_start"])
        return StepInputs(*pack(inp | {"feedback": feedback}), max_query_len, *pack(sampling), inp["query_start"])

    def finish_sampling(self, late: LateSampling) -> LateHeadInputs:
        """The packed sampling inputs of a `build(late=True)` step, its history inputs read now:
        from each request's known tokens (all but the one this step samples; a request finished
        meanwhile is a wasted row, its grammar no longer asked); the bitmask is left to
        `LateHeadInputs.fill`."""
        history, bitmask = self._history_inputs(late.rows, late.variant, late.num_tokens, late.num_seqs)
        if bitmask is not None:
            history["token_bitmask"] = np.empty((late.num_seqs, num_words(self.vocab_size)), np.int32)
        return LateHeadInputs(*pack(late.sampling | history), bitmask)

    def _history_inputs(self, rows: list[ScheduledRequest], variant: SamplingFeatures, t: int,
                        s: int) -> tuple[dict[str, np.ndarray], TokenBitmaskJob | None]:
        """The head inputs built from the requests' histories, per feature of `variant`:
        token history (penalties), logit bias and bans (-inf: EOS and stop ids before
        min_tokens), next prompt token per token (prompt logprobs, -1 = none); each padded to `s`
        rows (`t` tokens); and the allowed-token bitmask's job (grammar, allowed_token_ids,
        bad_words; None if `variant` has none). They read the known tokens only: built late, the
        token this step samples is pending."""
        out = {}
        if variant.penalties:
            hist = make_history([(r.request.prompt_token_ids, r.request.known_output_ids) for r in rows], s,
                                self.max_model_len)
            out["history"], out["history_is_output"] = hist.token_ids, hist.is_output
        if variant.prompt_logprobs:
            nxt, i = np.full(t, -1, np.int32), 0
            for r in rows:
                req = r.request
                if req.params.prompt_logprobs is not None:
                    pos = np.arange(r.start, r.start + r.num_new_tokens)
                    ok = pos + 1 < req.num_prompt_tokens
                    nxt[i:i + r.num_new_tokens][ok] = np.asarray(req.prompt_token_ids)[pos[ok] + 1]
                i += r.num_new_tokens
            out["prompt_next"] = nxt
        if variant.logit_bias:
            bias_ids = np.full((s, self.bias_width), -1, np.int32)
            bias_vals = np.zeros((s, self.bias_width), np.float32)
            for i, r in enumerate(rows):
                p = r.request.params
                entries = list(p.logit_bias.items())
                if len(r.request.known_output_ids) < p.min_tokens:
                    entries += [(tok, -np.inf) for tok in (*self.eos_token_ids, *p.stop_token_ids)]
                if entries:
                    bias_ids[i, :len(entries)], bias_vals[i, :len(entries)] = zip(*entries)
            out["bias_ids"], out["bias_vals"] = bias_ids, bias_vals
        if not variant.token_bitmask:
            return out, None
        return out, TokenBitmaskJob(
            [(r.request.params, r.request.known_output_ids if r.request.params.bad_words_token_ids else ())
             for r in rows],
            [r.request.structured_output if r.num_sampled and not r.request.is_finished else None for r in rows],
            s, self.vocab_size)

