"""The output side of the engine: per sequence, what the client sees (detokenized text, stop
strings, logprobs, counters), built from each step's `ModelRunnerOutput` into vLLM's
`RequestOutput` (cumulative, delta or final only). The engine core's `Request` keeps only
token ids; a stop string found here finishes it there."""
from __future__ import annotations

import time

import numpy as np
import transformers

from jaxpaged.engine.detokenizer import IncrementalDetokenizer, StopChecker
from jaxpaged.engine.outputs import (CompletionOutput, Logprob, PromptLogprobs, RequestMetrics, RequestOutput,
                                     SampleLogprobs)
from jaxpaged.engine.sampling_params import SamplingParams


class RequestState:
    """One sequence as its client sees it."""

    def __init__(self, request_id: str, index: int, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, detokenizer: IncrementalDetokenizer | None, arrival_time: float):
        self.request_id, self.index, self.prompt = request_id, index, prompt
        self.prompt_token_ids, self.params = prompt_token_ids, params
        self.detokenizer = detokenizer
        self.stop_checker = StopChecker(params.stop, params.include_stop_str_in_output)
        self.output_token_ids: list[int] = []
        self.text = ""  # output text (cut at a stop string)
        self.num_sent_chars = 0  # text already handed out as deltas
        self.num_sent_tokens = 0
        self.cumulative_logprob = 0.0
        self.logprobs: SampleLogprobs | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: PromptLogprobs | None = [None] if params.prompt_logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_cached_tokens = 0
        self.arrival_time = arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished_time: float | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def add_ids(self, token_ids: list[int], logprobs: list[float]) -> None:
        """Append tokens of a request that wants neither text nor top logprobs."""
        now = time.monotonic()
        self.first_token_time = self.first_token_time or now
        self.last_token_time = now
        self.output_token_ids += token_ids
        self.cumulative_logprob += sum(logprobs)

    def add_token(self, token_id: int, logprob: float, top: dict[int, Logprob] | None) -> str | None:
        """Append one token and its text; returns the stop string it completes, if any (the
        text is then cut there, and the engine finishes the request)."""
        now = time.monotonic()
        self.first_token_time = self.first_token_time or now
        self.last_token_time = now
        self.output_token_ids.append(token_id)
        self.cumulative_logprob += logprob
        if self.logprobs is not None:
            self.logprobs.append(top)
        if self.detokenizer is None:
            return None
        delta = self.detokenizer.add([token_id])
        self.text = self.detokenizer.text
        if len(self.output_token_ids) < self.params.min_tokens:
            return None
        match = self.stop_checker.find(self.text, len(delta))
        if match is None:
            return None
        stop, self.text = match  # the text ends at the stop string: nothing to flush
        self._finished("stop", stop)
        return stop

    def finish(self, reason: str, stop_reason: int | str | None) -> None:
        """The core finished the sequence (EOS, a stop token id, max_tokens): flush the text."""
        if self.detokenizer is not None:
            self.detokenizer.flush()
            self.text = self.detokenizer.text
        self._finished(reason, stop_reason)

    def _finished(self, reason: str, stop_reason: int | str | None) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason
        self.finished_time = time.monotonic()

    def take_text_delta(self) -> str:
        """Text that is safe to stream now (held back while it may start a stop string)."""
        if self.detokenizer is None:
            return ""
        delta = self.stop_checker.update(self.text, 0, self.num_sent_chars, finished=self.is_finished).delta
        self.num_sent_chars += len(delta)
        return delta


class OutputProcessor:
    def __init__(self, tokenizer: transformers.PreTrainedTokenizerBase | None):
        self.tokenizer = tokenizer

    def new_state(self, request_id: str, index: int, prompt: str | None, prompt_token_ids: list[int],
                  params: SamplingParams, arrival_time: float) -> RequestState:
        detok = (IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens,
                                        params.spaces_between_special_tokens)
                 if self.tokenizer is not None and params.detokenize else None)
        return RequestState(request_id, index, prompt, prompt_token_ids, params, detok, arrival_time)

    def logprobs_entry(self, token: int, logprob, rank, top_ids, top_logprobs, n: int) -> dict[int, Logprob]:
        """{token: its Logprob} plus the top `n` of `top_ids` / `top_logprobs` [N] (vLLM's
        per-position logprobs dict); the top arrays exist only when the step's sampling variant
        computes them, i.e. when some request has n > 0."""
        entry = {token: Logprob(float(logprob), int(rank), self._decode(token))}
        for r in range(n):
            tid = int(top_ids[r])
            entry.setdefault(tid, Logprob(float(top_logprobs[r]), r + 1, self._decode(tid)))
        return entry

    def add_prompt_logprobs(self, state: RequestState, prompt, offset: int, start: int, n: int) -> None:
        """Append the logprobs of prompt positions `start .. start + n` (rows from `offset` of
        the step's prompt logprobs arrays) to `state.prompt_logprobs`."""
        k = state.params.prompt_logprobs
        for j in range(n):
            pos = start + j
            if pos + 1 >= len(state.prompt_token_ids) or len(state.prompt_logprobs) != pos + 1:
                continue  # past the prompt, or already recorded before a preemption
            row = offset + j
            state.prompt_logprobs.append(self.logprobs_entry(
                state.prompt_token_ids[pos + 1], prompt.logprobs[row], prompt.ranks[row], prompt.top_ids[row],
                prompt.top_logprobs[row], k))

    def add_tokens(self, state: RequestState, token_ids: list[int], logprobs: list[float],
                   tops: tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None) -> tuple[int, str | None]:
        """Append a row's new tokens (the core's) with their logprobs; `tops`, given when the
        request asked for logprobs: ranks [K] and the top-N ids and logprobs [K, N] (None when
        the step's variant computed none). Returns how many it took and the stop string it
        stopped at (None: all taken)."""
        if tops is None and state.detokenizer is None:  # ids only: nothing to decode or check
            state.add_ids(token_ids, logprobs)
            return len(token_ids), None
        for j, token in enumerate(token_ids):
            top = None
            if tops is not None:
                ranks, top_ids, top_logprobs = tops
                top = self.logprobs_entry(token, logprobs[j], ranks[j],
                                          *((None, None) if top_ids is None else (top_ids[j], top_logprobs[j])),
                                          state.params.logprobs)
            stop = state.add_token(token, logprobs[j], top)
            if stop is not None:
                return j + 1, stop
        return len(token_ids), None

    def _decode(self, token_id: int) -> str | None:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else None

    @staticmethod
    def make_output(states: list[RequestState], stepped: list[RequestState]) -> RequestOutput | None:
        """The request's output after a step that advanced `stepped` (None: nothing to send)."""
        kind = states[0].params.output_kind
        finished = all(s.is_finished for s in states)
        if kind == "final_only" and not finished:
            return None
        completions = []
        for st in (stepped if kind == "delta" else states):
            if kind == "delta":
                text, ids = st.take_text_delta(), st.output_token_ids[st.num_sent_tokens:]
                logprobs = st.logprobs[st.num_sent_tokens:] if st.logprobs is not None else None
                st.num_sent_tokens = len(st.output_token_ids)
            else:
                text, ids, logprobs = st.text, list(st.output_token_ids), st.logprobs
            completions.append(CompletionOutput(
                st.index, text, ids, st.cumulative_logprob if st.logprobs is not None else None,
                logprobs, st.finish_reason, st.stop_reason))
        first = states[0]
        metrics = RequestMetrics(first.arrival_time, first.first_scheduled_time, first.first_token_time,
                                 max((s.last_token_time or 0) for s in states), first.finished_time)
        return RequestOutput(first.request_id, first.prompt, first.prompt_token_ids, first.prompt_logprobs,
                             completions, finished, metrics, first.num_cached_tokens)
