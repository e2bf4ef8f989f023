"""Engine-core state of one sequence: its token ids, KV progress and status (what the
scheduler and the runner need). Text, stop strings, logprobs and counters live on the output
side (`output_processor.RequestState`).

A request with `n` samples has `n` of these sharing one `request_id`; sample `i > 0` forks
the prompt blocks of sample 0 once they are computed.

Pending tokens: with async scheduling a step is launched before the previous step's sampled
ids reach the host. The sampled token is then appended as `PENDING` and the device feeds the
real id into the next step (`sample_row`: its row in the step that sampled it). A step can
read a pending token only as a row's last new token and only from the newest launched step
(`feeds_back`); any other unseen token must reach the host first (`LLMEngine._steps_kept`).
"""
from __future__ import annotations

import enum
import itertools
import time

from jaxpaged.engine.sample.features import SamplingFeatures
from jaxpaged.engine.sampling_params import SamplingParams
from jaxpaged.engine.structured_output.request import StructuredOutputRequest

_ids = itertools.count()
PENDING = -1  # an output token sampled on the device whose value the host has not seen yet


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 features: SamplingFeatures, max_tokens: int, seed: int, arrival_time: float | None = None,
                 cache_salt: str | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.features = features  # what its sampling needs (`sample.features`)
        self.max_tokens = max_tokens
        self.seed = seed
        self.cache_salt = cache_salt  # prefix-cache blocks are shared only under the same salt
        # prompt + output ids, one list (the input builder slices it every step); the last
        # `num_pending` are PENDING
        self.all_token_ids = list(prompt_token_ids)
        self.num_pending = 0
        self.sample_row = -1  # this request's row in the step that sampled its newest token
        self.final_token_scheduled = False  # max_tokens reached by scheduled tokens: schedule no more
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose KV is in the cache (or written by a launched step)
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache on admission
        self.num_preemptions = 0  # times it was preempted (its KV freed, to be recomputed)
        # draft-model speculation: tokens whose KV is in the draft's pool (`draft_model_proposer`)
        self.num_draft_computed_tokens = 0
        self.fork_parent: Request | None = None  # sample 0, for samples i > 0
        self.structured_output: StructuredOutputRequest | None = None  # its grammar, if it has one
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.arrival_time = arrival_time or time.monotonic()
        self.first_scheduled_time: float | None = None
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
    def num_known_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_pending

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def fed_back_row(self, end: int) -> int:
        """The row of the previous step whose sampled id the device feeds in as token
        `end - 1` (-1: the host knows that id)."""
        return self.sample_row if self.all_token_ids[end - 1] == PENDING else -1

    def feeds_back(self, start: int, n: int, sampled_by_newest: bool) -> bool:
        """Whether a step scheduling tokens `start .. start + n` can run before the host sees
        the pending ones: at most one is unseen, the last token of the request, sampled by the
        newest launched step (`sampled_by_newest`)."""
        end, num_tokens = start + n, len(self.all_token_ids)
        unseen = end - max(num_tokens - self.num_pending, start)
        return unseen <= 0 or (unseen == 1 and end == num_tokens and sampled_by_newest)

    def add_pending(self, row: int) -> None:
        """A step sampling this request's next token was launched (row `row` of its output)."""
        self.all_token_ids.append(PENDING)
        self.num_pending += 1
        self.sample_row = row
        self.final_token_scheduled = self.num_output_tokens >= self.max_tokens

    def append_sampled(self, token_ids: list[int], num_launched: int, row: int,
                       eos_token_ids: tuple[int, ...]) -> int:
        """Append a step's sampled tokens under the stop rules and the grammar; returns how many
        were taken (those after a stop are dropped). Tokens beyond `num_launched` are accepted
        drafts: each gets its pending slot first."""
        k, grammar = 0, self.structured_output
        for token in token_ids:
            if grammar is not None and not grammar.accept(token):
                self.finish("stop")  # a dead end: the grammar allowed no token
                break
            if k >= num_launched:
                self.add_pending(row)
            self.append_token(token, eos_token_ids)
            k += 1
            if grammar is not None and not self.is_finished and grammar.is_terminated:
                self.finish("stop")
            if self.is_finished:
                break
        return k

    def append_token(self, token_id: int, eos_token_ids: tuple[int, ...]) -> None:
        """Fill the oldest pending token and apply the token-id stop rules (EOS, stop_token_ids,
        max_tokens; none before min_tokens). Stop strings are the output side's."""
        at = len(self.all_token_ids) - self.num_pending
        pos = at - len(self.prompt_token_ids)
        self.all_token_ids[at] = token_id
        self.num_pending -= 1
        p, n = self.params, pos + 1
        if n >= p.min_tokens and not p.ignore_eos and token_id in eos_token_ids:
            self.finish("stop", None)
        elif n >= p.min_tokens and token_id in p.stop_token_ids:
            self.finish("stop", token_id)
        elif n >= self.max_tokens:
            self.finish("length")

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        """Finished (or aborted): the tokens sampled after its last one are dropped."""
        del self.all_token_ids[len(self.all_token_ids) - self.num_pending:]
        self.num_pending = 0
        self.status = RequestStatus.FINISHED
        self.finish_reason, self.stop_reason = reason, stop_reason
        self.finished_time = time.monotonic()
