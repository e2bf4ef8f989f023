"""Reasoning parsers by `--reasoning-parser` name (vLLM's names): each splits a reasoning
model's `<think>` block from its answer, whole or streamed."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxpaged.serve.reasoning.abs_reasoning_parsers import ReasoningParser

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {}


def register_reasoning_parser(name: str):
    """Class decorator: the parser answers to `--reasoning-parser name`."""
    def register(cls: type[ReasoningParser]) -> type[ReasoningParser]:
        REASONING_PARSERS[name] = cls
        return cls
    return register


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}: one of {', '.join(sorted(REASONING_PARSERS))}")
    return REASONING_PARSERS[name]


# the parsers register themselves when imported
from jaxpaged.serve.reasoning import deepseek_r1_reasoning_parser, qwen3_reasoning_parser  # noqa: E402, F401
