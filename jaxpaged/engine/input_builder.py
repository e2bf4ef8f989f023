"""The host side of a step (the input builder): the scheduled rows padded to a token
bucket and packed into the step programs' int32 buffers (`host_buffer.py`: one host-to-device
transfer per program), with the sampling inputs of the step's head mode."""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxpaged.engine.host_buffer import pack
from jaxpaged.engine.sampler import make_history, make_sampling_input, row_keys
from jaxpaged.engine.sampling_params import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS
from jaxpaged.engine.sequence import PENDING
from jaxpaged.kernels.paged_attention_gpu import DECODE_ONLY_MAX_TOKENS
from jaxpaged.models.step_input import make_step_input


def _fields(x) -> dict:
    return {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}


class InputBuilder:
    """Packs scheduled steps for `ModelRunner`; `short_query_buckets` get the decode launch
    hint when every query is short, and `num_steps` > 1 builds multi-step decode inputs."""

    def __init__(self, block_size: int, max_num_seqs: int, max_model_len: int, eos_token_ids: tuple[int, ...],
                 short_query_buckets: list[int], num_steps: int = 1):
        self.block_size, self.max_num_seqs, self.max_model_len = block_size, max_num_seqs, max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.eos_token_ids = eos_token_ids
        self.bias_width = MAX_LOGIT_BIAS + MAX_STOP_TOKEN_IDS + len(eos_token_ids)  # min_tokens bans EOS too
        self.short_query_buckets, self.num_steps = short_query_buckets, num_steps

    def build(self, scheduled, block_tables, t: int, mode: str, steps: list[int] | None = None):
        """(rows, (packed step inputs, layout, max_query_len), (packed sampling inputs, layout),
        query_start) of a step padded to `t` tokens (and min(t, max_num_seqs) sequences). With
        `steps` (multi-step decode: iterations per row) one buffer holds both, for t rows,
        with the sampling keys of every iteration, and the sampling slot is None."""
        s = t if steps is not None else min(t, self.max_num_seqs)
        seqs, rows = [], []
        feedback = np.full(t, -1, np.int32)
        offset = 0
        for (seq, n), table in zip(scheduled, block_tables):
            start = seq.num_computed_tokens
            new = seq.all_token_ids[start:start + n]
            if new[-1] == PENDING:  # sampled by the previous step: read it on the device
                feedback[offset + n - 1] = seq.sample_row
            seqs.append((new, start, table))
            rows.append((seq, start, n, start + n == seq.num_tokens))
            offset += n
        inp = _fields(make_step_input(seqs, self.block_size, t, s, self.max_blocks))
        # keys [K, rows, 2] (K = 1 unless multi-step): iteration j draws the token after done + j
        k, done = (self.num_steps if steps is not None else 1), [seq.num_output_tokens for seq, _ in scheduled]
        keys = row_keys([seq.seed for seq, _ in scheduled] * k, [d + j for j in range(k) for d in done])
        keys = keys.reshape(k, len(done), 2)
        sampling = {"logits_index": inp.pop("logits_index"),
                    **_fields(make_sampling_input([seq.params for seq, _ in scheduled], keys[0], s))}
        if mode == "full":
            sampling |= self._full_input(scheduled, t, s)
        longest = max((n for _, n in scheduled), default=0)
        short = t in self.short_query_buckets and longest <= DECODE_ONLY_MAX_TOKENS
        max_query_len = DECODE_ONLY_MAX_TOKENS if short else None
        if steps is not None:
            sampling["keys"] = np.zeros((k, s, 2), np.uint32)
            sampling["keys"][:, :len(done)] = keys
            sampling["steps"] = np.zeros(s, np.int32)
            sampling["steps"][:len(steps)] = steps
            buf, layout = pack(inp | {"feedback": feedback} | sampling)
            return rows, (buf, layout, max_query_len), None, inp["query_start"]
        return rows, (*pack(inp | {"feedback": feedback}), max_query_len), pack(sampling), inp["query_start"]

    def _full_input(self, scheduled, t: int, s: int) -> dict[str, np.ndarray]:
        """Extra inputs of the `full` variant: token history (penalties), next prompt token per
        token (prompt logprobs, -1 = none), logit bias / bans (-inf: EOS and stop ids before
        min_tokens), each padded to `s` rows."""
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
            if seq.num_output_tokens < p.min_tokens:
                entries += [(t, -np.inf) for t in (*self.eos_token_ids, *p.stop_token_ids)]
            if entries:
                bias_ids[row, :len(entries)], bias_vals[row, :len(entries)] = zip(*entries)
        return {"history": hist, "history_is_output": is_out, "prompt_next": nxt,
                "bias_ids": bias_ids, "bias_vals": bias_vals}
