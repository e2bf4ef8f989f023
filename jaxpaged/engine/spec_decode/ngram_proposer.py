"""N-gram (prompt lookup) proposer, on the host, as vLLM V1's `NgramProposer`: find the longest
suffix of prompt + output, of `prompt_lookup_min` to `prompt_lookup_max` tokens, that occurred
earlier in them, and propose the (up to) k tokens that followed its first occurrence."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int, num_speculative_tokens: int):
        self.min_n, self.max_n, self.k = prompt_lookup_min, prompt_lookup_max, num_speculative_tokens

    def propose(self, token_ids: Sequence[int], max_tokens: int | None = None) -> list[int]:
        """Draft tokens after `token_ids` (at most `max_tokens`, default k; empty when no
        n-gram matches). The longest n wins; among its matches, the first (vLLM's rule)."""
        k = self.k if max_tokens is None else min(self.k, max_tokens)
        tokens = np.asarray(token_ids, np.int64)
        total = tokens.shape[0]
        if k <= 0 or total < self.min_n + 1:
            return []
        for n in range(min(self.max_n, total - 1), self.min_n - 1, -1):
            # windows starting at 0 .. total - n - 1: every occurrence before the suffix itself
            windows = sliding_window_view(tokens[:total - 1], n)
            hits = np.flatnonzero((windows == tokens[total - n:]).all(axis=1))
            if hits.size:
                start = int(hits[0]) + n
                return tokens[start:start + k].tolist()
        return []
