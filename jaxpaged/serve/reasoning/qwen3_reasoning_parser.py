"""`qwen3`: Qwen3 reasons in a `<think>` block that the reply opens itself, or that the chat
template opened in the prompt (the thinking-only models); with `enable_thinking: false` the
template closes an empty block in the prompt and the whole reply is content."""
from __future__ import annotations

from jaxpaged.serve.reasoning import register_reasoning_parser
from jaxpaged.serve.reasoning.abs_reasoning_parsers import ReasoningParser


@register_reasoning_parser("qwen3")
class Qwen3ReasoningParser(ReasoningParser):
    pass
