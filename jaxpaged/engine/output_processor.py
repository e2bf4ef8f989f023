"""Output processing: a step's sampled tokens and logprobs as vLLM's per-position logprobs
dicts, and a request's sequences as a `RequestOutput` (cumulative, delta or final only)."""
from __future__ import annotations

import transformers

from jaxpaged.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxpaged.engine.sequence import Sequence


class OutputProcessor:
    def __init__(self, tokenizer: transformers.PreTrainedTokenizerBase | None):
        self.tokenizer = tokenizer

    def logprobs_entry(self, token: int, logprob, rank, top_ids, top_logprobs, row: int,
                       n: int) -> dict[int, Logprob]:
        """{token: its Logprob} plus the top `n` of `row` (vLLM's per-position logprobs dict);
        the top arrays exist only in the `full` step variant, i.e. when some request has n > 0."""
        entry = {token: Logprob(float(logprob), int(rank), self._decode(token))}
        for r in range(n):
            tid = int(top_ids[row, r])
            entry.setdefault(tid, Logprob(float(top_logprobs[row, r]), r + 1, self._decode(tid)))
        return entry

    def add_prompt_logprobs(self, seq: Sequence, prompt, offset: int, start: int, n: int) -> None:
        """Append the logprobs of prompt positions `start .. start + n` (rows from `offset` of
        the step's `prompt` arrays) to `seq.prompt_logprobs`."""
        k = seq.params.prompt_logprobs
        for j in range(n):
            pos = start + j
            if pos + 1 >= seq.num_prompt_tokens or len(seq.prompt_logprobs) != pos + 1:
                continue  # past the prompt, or already recorded before a preemption
            row = offset + j
            seq.prompt_logprobs.append(self.logprobs_entry(
                seq.prompt_token_ids[pos + 1], prompt.logprobs[row], prompt.ranks[row], prompt.top_ids,
                prompt.top_logprobs, row, k))

    def _decode(self, token_id: int) -> str | None:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else None

    @staticmethod
    def make_output(seqs: list[Sequence], stepped: list[Sequence]) -> RequestOutput | None:
        """The request's output after a step that advanced `stepped` (None: nothing to send)."""
        kind = seqs[0].params.output_kind
        finished = all(s.is_finished for s in seqs)
        if kind == "final_only" and not finished:
            return None
        completions = []
        for seq in (stepped if kind == "delta" else seqs):
            known = seq.known_output_ids
            if kind == "delta":
                text, ids = seq.take_text_delta(), known[seq.num_sent_tokens:]
                logprobs = seq.logprobs[seq.num_sent_tokens:] if seq.logprobs is not None else None
                seq.num_sent_tokens = len(known)
            else:
                text, ids, logprobs = seq.text, known, seq.logprobs
            completions.append(CompletionOutput(
                seq.index, text, ids, seq.cumulative_logprob if seq.logprobs is not None else None,
                logprobs, seq.finish_reason, seq.stop_reason))
        first = seqs[0]
        metrics = RequestMetrics(first.arrival_time, first.first_scheduled_time, first.first_token_time,
                                 max((s.last_token_time or 0) for s in seqs), first.finished_time)
        return RequestOutput(first.request_id, first.prompt, first.prompt_token_ids, first.prompt_logprobs,
                             completions, finished, metrics, first.num_cached_tokens)
