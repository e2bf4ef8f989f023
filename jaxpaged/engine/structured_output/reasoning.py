"""Reasoning before structured output (vLLM's `reasoning_ended`): with a reasoning parser
(`EngineConfig.reasoning_parser`) a constrained sample may think first. Its grammar neither
masks nor advances until the sample emits the reasoning end tag; the tag itself is not the
grammar's. A prompt whose last reasoning tag is the end (Qwen3's template closes an empty
block when `enable_thinking` is false) starts constrained."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

THINK_TAGS = ("<think>", "</think>")
# each --reasoning-parser's (start, end) tags (serve/reasoning/ splits the reply at the same tags)
REASONING_TAGS = {"deepseek_r1": THINK_TAGS, "qwen3": THINK_TAGS}


@dataclasses.dataclass(frozen=True)
class ReasoningTokens:
    """A reasoning parser's tags in one tokenizer: each tag's id, or its token ids where the
    tokenizer has no such token (then a model that spells the tag otherwise is not seen)."""
    start_ids: tuple[int, ...]
    end_ids: tuple[int, ...]

    @classmethod
    def of(cls, parser: str, tokenizer) -> ReasoningTokens:
        """`parser`'s tags as `tokenizer` encodes them (ValueError without a tokenizer)."""
        if tokenizer is None:
            raise ValueError(f"reasoning parser {parser!r} needs the model's tokenizer")
        return cls(*(tuple(tokenizer.encode(tag, add_special_tokens=False)) for tag in REASONING_TAGS[parser]))

    def ended(self, token_ids: Sequence[int]) -> bool:
        """Whether the last reasoning tag in `token_ids` is the end (vLLM's `is_reasoning_end`)."""
        ids = list(token_ids)
        for i in range(len(ids), 0, -1):
            if _ends_with(ids, i, self.start_ids):
                return False
            if _ends_with(ids, i, self.end_ids):
                return True
        return False


def _ends_with(ids: list[int], i: int, tag: tuple[int, ...]) -> bool:
    return i >= len(tag) and tuple(ids[i - len(tag):i]) == tag
