"""N-gram (prompt lookup) proposer, on the host, as vLLM V1's `NgramProposer`: find the longest
suffix of prompt + output, of `prompt_lookup_min` to `prompt_lookup_max` tokens, that occurred
earlier in them, and propose the (up to) k tokens that followed its first occurrence."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from jaxpaged.engine.request import Request
from jaxpaged.engine.sample.features import VERIFY_VARIANTS
from jaxpaged.engine.spec_decode.config import SpeculativeConfig

if TYPE_CHECKING:
    from jaxpaged.engine.scheduler_output import ScheduledRequest

VERIFIABLE = VERIFY_VARIANTS[-1]  # the sampling features the verify head serves (its largest variant)


def max_drafts(seq: Request, budget: int, max_model_len: int) -> int:
    """How many drafts `seq`'s next step may carry (<= 0: none): a decoding row whose tokens
    are all on the host and whose sampling the verify head does, at most `budget`, none past
    max_tokens or max_model_len, none before min_tokens (its bans of EOS and the stop ids end
    at a position; the verify head's bias is the same at every position)."""
    if seq.num_pending or seq.num_computed_tokens + 1 != seq.num_tokens or not VERIFIABLE.covers(seq.features) \
            or seq.num_output_tokens < seq.params.min_tokens:
        return 0
    return min(budget, seq.max_tokens - seq.num_output_tokens - 1, max_model_len - seq.num_tokens)


class NgramProposer:
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int, num_speculative_tokens: int):
        self.min_n, self.max_n, self.k = prompt_lookup_min, prompt_lookup_max, num_speculative_tokens

    def propose(self, token_ids: Sequence[int], max_tokens: int | None = None) -> list[int]:
        """Draft tokens after `token_ids` (at most `max_tokens`, default k; empty when no
        n-gram matches). The longest n wins; among its matches, the first (vLLM's rule).
        One pass over the tokens: the earlier occurrences of the last token, then how far back
        each one matches (at most `prompt_lookup_max`)."""
        k = self.k if max_tokens is None else min(self.k, max_tokens)
        tokens = np.asarray(token_ids, np.int64)
        total = tokens.shape[0]
        if k <= 0 or total < self.min_n + 1:
            return []
        ends = np.flatnonzero(tokens[:total - 1] == tokens[-1])  # where earlier occurrences end
        length = np.ones(ends.shape[0], np.int64)  # each one's match with the suffix so far
        for j in range(1, self.max_n):
            grow = (length == j) & (ends >= j)
            grow[grow] = tokens[ends[grow] - j] == tokens[total - 1 - j]
            length += grow
        if not ends.size or length.max() < self.min_n:
            return []
        start = int(ends[np.argmax(length == length.max())]) + 1  # the first of the longest
        return tokens[start:start + k].tolist()


class NgramDrafter:
    """The scheduler's view of n-gram speculation: whether a step speculates and a decoding
    row's drafts. A row gets drafts only when the host knows all its tokens (speculation runs
    synchronously), it decodes one token, and its sampling is one the verify head does
    (greedy, temperature, min_p, top-k, top-p, logit bias, top-N logprobs: `VERIFIABLE`). With a synthetic
    acceptance rate every such row gets k drafts (copies of its last token)."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.config, self.max_model_len = config, max_model_len
        self.proposer = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max,
                                      config.num_speculative_tokens)

    def speculates(self, num_running: int) -> bool:
        return self.config.speculates(num_running)

    def propose(self, seq: Request, budget: int) -> list[int]:
        """Drafts for `seq`'s next step, at most `budget`, none past max_tokens or max_model_len."""
        limit = max_drafts(seq, budget, self.max_model_len)
        if limit <= 0:
            return []
        if self.config.synthetic_acceptance_rate is not None:  # benchmarks: k drafts always, values unread
            return seq.all_token_ids[-1:] * min(limit, self.config.num_speculative_tokens)
        return self.proposer.propose(seq.all_token_ids, limit)

    def fill(self, rows: list[ScheduledRequest]) -> None:
        """N-gram drafts are proposed while scheduling (`propose`): nothing left to do."""
