"""What the scheduler hands the model runner each step (vLLM V1's `sched/output.py`): the
scheduled rows (`ScheduledRequest`: a request's new tokens, block table, samples, drafts) and
the step (`SchedulerOutput`)."""
from __future__ import annotations

import dataclasses

from jaxpaged.engine.request import Request


@dataclasses.dataclass(slots=True)
class ScheduledRequest:
    """One row of a step: `num_new_tokens` tokens of `request` from position `start` (its
    computed count when scheduled), the block table they read and write, and how many tokens
    the row samples: 0 for a prompt chunk that does not reach the end, else 1, or K for the K
    iterations of a multi-step decode."""
    request: Request
    start: int
    num_new_tokens: int
    block_table: list[int]
    num_sampled: int = 1
    draft_token_ids: list[int] = dataclasses.field(default_factory=list)  # speculated tokens after the last

    @classmethod
    def of(cls, request: Request, n: int, block_table: list[int], num_steps: int = 1,
           drafts: list[int] | None = None) -> ScheduledRequest:
        start, drafts = request.num_computed_tokens, drafts or []
        # max_tokens 0: the prompt only
        samples = start + n - len(drafts) == request.num_tokens and request.max_tokens > 0
        return cls(request, start, n, block_table, num_steps if samples else 0, drafts)


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted: list[Request] = dataclasses.field(default_factory=list)
    multi_step: bool = False  # an all-decode step run as the decode loop (rows' num_steps iterations)

    @property
    def num_tokens(self) -> int:
        return sum(r.num_new_tokens for r in self.scheduled)

    @property
    def speculative(self) -> bool:
        """Some row carries draft tokens (the step runs the verify head)."""
        return any(r.draft_token_ids for r in self.scheduled)

    def without_finished(self) -> SchedulerOutput:
        """The rows of requests still unfinished (others finished after scheduling: their
        blocks are already free)."""
        return dataclasses.replace(self, scheduled=[r for r in self.scheduled if not r.request.is_finished])
