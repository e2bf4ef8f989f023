"""`deepseek_r1`: DeepSeek-R1 and its distills always reason first: the reply is reasoning up to
`</think>` (its `<think>` is in the prompt, or the reply's first text), the answer after it."""
from __future__ import annotations

from jaxpaged.serve.reasoning import register_reasoning_parser
from jaxpaged.serve.reasoning.abs_reasoning_parsers import ReasoningParser


@register_reasoning_parser("deepseek_r1")
class DeepSeekR1ReasoningParser(ReasoningParser):
    reasons_first = True
