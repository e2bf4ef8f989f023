"""Reasoning before structured output (vLLM's `reasoning_ended`): with a reasoning parser
(`EngineConfig.reasoning_parser`) a constrained sample may think first. Its grammar neither
masks nor advances until the sample emits the reasoning end token; the end token itself is not
the grammar's. A prompt whose last reasoning tag is the end (Qwen3's template closes an empty
block when `enable_thinking` is false) starts constrained."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

THINK_TAGS = ("<think>", "</think>")
# each --reasoning-parser's (start, end) tags (serve/reasoning/ splits the reply at the same tags)
REASONING_TAGS = {"deepseek_r1": THINK_TAGS, "qwen3": THINK_TAGS}


@dataclasses.dataclass(frozen=True)
class ReasoningTokens:
    """The token ids of a reasoning parser's tags in one tokenizer."""
    start_id: int
    end_id: int

    @classmethod
    def of(cls, parser: str, vocab: dict[str, int]) -> ReasoningTokens:
        """The ids of `parser`'s tags in `vocab` (a tokenizer's `get_vocab()`); ValueError naming
        a tag that is not one token."""
        ids = [vocab.get(tag) for tag in REASONING_TAGS[parser]]
        if None in ids:
            missing = [tag for tag, i in zip(REASONING_TAGS[parser], ids) if i is None]
            raise ValueError(f"reasoning parser {parser!r}: the tokenizer has no {' or '.join(missing)} token")
        return cls(*ids)

    def ended(self, token_ids: Sequence[int]) -> bool:
        """Whether the last reasoning tag in `token_ids` is the end (vLLM's `is_reasoning_end`)."""
        for token in reversed(token_ids):
            if token == self.start_id:
                return False
            if token == self.end_id:
                return True
        return False
