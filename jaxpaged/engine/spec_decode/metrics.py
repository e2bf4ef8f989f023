"""Speculative decoding's counters, vLLM's `vllm:spec_decode_*` (acceptance rate =
accepted / draft tokens; mean accepted length per draft = 1 + accepted / drafts)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class SpecDecodingStats:
    num_spec_tokens: int  # k
    num_drafts: int = 0  # rows verified with at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.num_accepted_tokens_per_pos = [0] * self.num_spec_tokens

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        """One row's verification: its drafts, and how many of them (a prefix) were accepted."""
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        for j in range(num_accepted):
            self.num_accepted_tokens_per_pos[j] += 1
