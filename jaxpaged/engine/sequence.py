"""One sequence being generated: its tokens, KV progress, text and stop state.

A request with `n` samples has `n` sequences sharing one `request_id`; sample `i > 0` forks
the prompt blocks of sample 0 once they are computed.
"""
from __future__ import annotations

import enum
import itertools
import time

from jaxpaged.engine.detokenizer import IncrementalDetokenizer, StopChecker
from jaxpaged.engine.outputs import Logprob, PromptLogprobs, SampleLogprobs
from jaxpaged.engine.sampling_params import SamplingParams

_ids = itertools.count()
PENDING = -1  # an output token sampled on the device whose value the host has not seen yet


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, index: int, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, max_tokens: int, seed: int,
                 detokenizer: IncrementalDetokenizer | None, arrival_time: float | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.max_tokens = max_tokens
        # prompt + output ids, one list (the runner slices it every step); the last
        # `num_pending` are PENDING (sampled on the device, not yet seen)
        self.all_token_ids = list(prompt_token_ids)
        self.num_pending = 0
        self.final_token_scheduled = False  # max_tokens reached by scheduled tokens: schedule no more
        self.sample_row = -1  # this sequence's row in the step that sampled its newest token
        self.params = params
        self.seed = seed
        self.status = Status.WAITING
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache on admission
        self.fork_parent: Sequence | None = None  # sample 0, for samples i > 0
        self.detokenizer = detokenizer
        self.stop_checker = StopChecker(params.stop, params.include_stop_str_in_output)
        self.text = ""  # output text (cut at a stop string)
        self.num_sent_chars = 0  # text already handed out as deltas
        self.num_sent_tokens = 0
        self.cumulative_logprob = 0.0
        self.logprobs: SampleLogprobs | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: PromptLogprobs | None = [None] if params.prompt_logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.arrival_time = arrival_time or time.monotonic()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def known_output_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):len(self.all_token_ids) - self.num_pending]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        del self.all_token_ids[len(self.all_token_ids) - self.num_pending:]
        self.num_pending = 0
        self.status = Status.FINISHED
        self.finish_reason, self.stop_reason = reason, stop_reason
        self.finished_time = time.monotonic()

    def add_pending(self, row: int) -> None:
        """A step sampling this sequence's next token was launched (row `row` of its output)."""
        self.all_token_ids.append(PENDING)
        self.num_pending += 1
        self.sample_row = row
        self.final_token_scheduled = self.num_output_tokens >= self.max_tokens

    def append_token(self, token_id: int, logprob: float, top: dict[int, Logprob] | None,
                     eos_token_ids: tuple[int, ...]) -> None:
        """Fill the oldest pending token, detokenize it and apply the stop rules (vLLM's order).
        A finished sequence drops the tokens sampled after its last one."""
        now = time.monotonic()
        self.first_token_time = self.first_token_time or now
        self.last_token_time = now
        pos = self.num_output_tokens - self.num_pending
        self.all_token_ids[self.num_prompt_tokens + pos] = token_id
        self.num_pending -= 1
        self.cumulative_logprob += logprob
        if self.logprobs is not None:
            self.logprobs.append(top)
        p, n = self.params, pos + 1
        if self.detokenizer is not None:
            delta = self.detokenizer.add([token_id])
            self.text = self.detokenizer.text
            match = self.stop_checker.find(self.text, len(delta)) if n >= p.min_tokens else None
            if match is not None:
                stop, self.text = match
                return self.finish("stop", stop)
        if n >= p.min_tokens and not p.ignore_eos and token_id in eos_token_ids:
            self.finish("stop", None)
        elif n >= p.min_tokens and token_id in p.stop_token_ids:
            self.finish("stop", token_id)
        elif n >= self.max_tokens:
            self.finish("length")
        if self.is_finished and self.detokenizer is not None:
            self.detokenizer.flush()
            self.text = self.detokenizer.text

    def take_text_delta(self) -> str:
        """Text that is safe to stream now (held back while it may start a stop string)."""
        if self.detokenizer is None:
            return ""
        delta = self.stop_checker.update(self.text, 0, self.num_sent_chars, finished=self.is_finished).delta
        self.num_sent_chars += len(delta)
        return delta
