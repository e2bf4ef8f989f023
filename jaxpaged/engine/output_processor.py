"""The output side of the engine: per sample, what the client sees (detokenized text, stop
strings, logprobs, counters), built from the core's `EngineCoreOutput`s into vLLM's
`RequestOutput` (cumulative, delta or final only). The engine core keeps only token ids; a stop
string found here is handed back to it (`process_outputs` returns the samples to finish).
"""
from __future__ import annotations

import time

import transformers

from jaxpaged.engine.detokenizer import IncrementalDetokenizer, StopChecker
from jaxpaged.engine.messages import EngineCoreOutput, EngineCoreRequest, PromptLogprobsChunk
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
        self._token_text: dict[int, str] = {}  # a token's text alone, for logprobs (decoded once)
        self.states: dict[str, list[RequestState]] = {}  # each request's samples, index for index

    def add_request(self, req: EngineCoreRequest, prompt: str | None) -> None:
        p = req.params
        self.states[req.request_id] = [
            RequestState(req.request_id, i, prompt, req.prompt_token_ids, p,
                         IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, p.skip_special_tokens,
                                                p.spaces_between_special_tokens)
                         if self.tokenizer is not None and p.detokenize else None, req.arrival_time)
            for i in range(p.n)]

    def abort(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.states)

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[tuple[str, int, str]]]:
        """Apply one core step's outputs: the `RequestOutput`s to hand out, and the samples
        (request_id, index, stop string) that a stop string finished, for the core to finish."""
        touched: dict[str, list[RequestState]] = {}
        stopped = []
        for o in outputs:
            states = self.states.get(o.request_id)
            if states is None or states[o.index].is_finished:  # aborted, or stopped by a stop string
                continue
            state = states[o.index]
            if o.prompt_logprobs is not None and state.prompt_logprobs is not None:
                self._add_prompt_logprobs(state, o.prompt_logprobs)
            if not o.new_token_ids and o.finish_reason is None:
                continue
            stop = self._add_tokens(state, o) if o.new_token_ids else None
            if stop is not None:
                stopped.append((o.request_id, o.index, stop))
            elif o.finish_reason is not None:
                state.finish(o.finish_reason, o.stop_reason)
            state.first_scheduled_time, state.num_cached_tokens = o.first_scheduled_time, o.num_cached_tokens
            touched.setdefault(o.request_id, []).append(state)
        results = []
        for request_id, stepped in touched.items():
            states = self.states[request_id]
            finished = states[0].is_finished if len(states) == 1 else all(s.is_finished for s in states)
            if finished or states[0].params.output_kind != "final_only":
                results.append(self.make_output(states, stepped, finished))
            if finished:
                del self.states[request_id]
        return results, stopped

    def logprobs_entry(self, token: int, logprob: float, rank: int, top_ids: list[int] | None,
                       top_logprobs: list[float] | None, n: int) -> dict[int, Logprob]:
        """{token: its Logprob} plus the top `n` of `top_ids` / `top_logprobs` (vLLM's
        per-position logprobs dict); the top lists exist only when the step's sampling variant
        computes them, i.e. when some request has n > 0."""
        entry = {token: Logprob(float(logprob), int(rank), self._decode(token))}
        for r in range(n):
            tid = int(top_ids[r])
            entry.setdefault(tid, Logprob(float(top_logprobs[r]), r + 1, self._decode(tid)))
        return entry

    def _add_prompt_logprobs(self, state: RequestState, chunk: PromptLogprobsChunk) -> None:
        """Append the logprobs of prompt positions `chunk.start ..` to `state.prompt_logprobs`."""
        k = state.params.prompt_logprobs
        for j, logprob in enumerate(chunk.logprobs):
            pos = chunk.start + j
            if len(state.prompt_logprobs) != pos + 1:
                continue  # already recorded before a preemption
            state.prompt_logprobs.append(self.logprobs_entry(
                state.prompt_token_ids[pos + 1], logprob, chunk.ranks[j], chunk.top_ids[j], chunk.top_logprobs[j], k))

    def _add_tokens(self, state: RequestState, o: EngineCoreOutput) -> str | None:
        """Append a sample's new tokens with their logprobs; returns the stop string it stopped
        at (the tokens after it are dropped), else None."""
        if o.ranks is None and state.detokenizer is None:  # ids only: nothing to decode or check
            state.add_ids(o.new_token_ids, o.new_logprobs)
            return None
        for j, token in enumerate(o.new_token_ids):
            top = None
            if o.ranks is not None:
                top = self.logprobs_entry(token, o.new_logprobs[j], o.ranks[j],
                                          o.top_ids[j] if o.top_ids is not None else None,
                                          o.top_logprobs[j] if o.top_logprobs is not None else None,
                                          state.params.logprobs)
            stop = state.add_token(token, o.new_logprobs[j], top)
            if stop is not None:
                return stop
        return None

    def _decode(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    @staticmethod
    def make_output(states: list[RequestState], stepped: list[RequestState], finished: bool) -> RequestOutput:
        """The request's output after a step that advanced `stepped`."""
        kind = states[0].params.output_kind
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
                                 max(s.last_token_time or 0 for s in states) if len(states) > 1
                                 else first.last_token_time, first.finished_time)
        return RequestOutput(first.request_id, first.prompt, first.prompt_token_ids, first.prompt_logprobs,
                             completions, finished, metrics, first.num_cached_tokens)
