"""Reasoning parsers by `--reasoning-parser` name (vLLM's names): each splits a reasoning
model's `<think>` block from its answer, whole or streamed."""
from __future__ import annotations

from jaxpaged.serve.parser_registry import ParserRegistry

REASONING_PARSERS = ParserRegistry("reasoning parser")
register_reasoning_parser = REASONING_PARSERS.register
get_reasoning_parser = REASONING_PARSERS.get_parser

# the parsers register themselves when imported
from jaxpaged.serve.reasoning import deepseek_r1_reasoning_parser, qwen3_reasoning_parser  # noqa: E402, F401
