"""A chat choice's generated text -> content, `reasoning_content` and `tool_calls`: the
reasoning parser (if the server has one) splits off the `<think>` block, then the request's tool
parser (if it offers tools) reads the calls from the rest."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jaxpaged.serve.chat_messages import ChatCompletionNamedToolChoiceParam
from jaxpaged.serve.chat_outputs import DeltaMessage, ToolCall
from jaxpaged.serve.protocol import ChatCompletionRequest
from jaxpaged.serve.reasoning.abs_reasoning_parsers import ReasoningParser
from jaxpaged.serve.tool_parsers.abstract_tool_parser import ToolParser
from jaxpaged.serve.tool_parsers.tool_choice import NamedToolParser, RequiredToolParser

AUTO_NEEDS_PARSER = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'


@dataclasses.dataclass
class ParsedReply:
    content: str | None
    reasoning_content: str | None
    tool_calls: list[ToolCall]


def request_tool_parser(req: ChatCompletionRequest, auto: type[ToolParser] | None) -> Callable[[], ToolParser] | None:
    """What reads a choice's tool calls: none for `tool_choice` "none", the server's parser for
    "auto" (`auto`; ValueError when the server has none, as vLLM), the schema's format for
    "required" and a named function."""
    if req.tool_choice == "none":
        return None
    if isinstance(req.tool_choice, ChatCompletionNamedToolChoiceParam):
        name = req.tool_choice.function.name
        return lambda: NamedToolParser(name)
    if req.tool_choice == "required":
        return RequiredToolParser
    if auto is None:
        raise ValueError(AUTO_NEEDS_PARSER)
    return auto


class ReplyParser:
    """One choice's parsers, whole (`parse`) or streamed (`stream`); `parallel_tool_calls` false
    keeps the first call only (vLLM)."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None, parallel_tool_calls: bool = True):
        self.reasoning, self.tools, self.parallel_tool_calls = reasoning, tools, parallel_tool_calls

    def parse(self, text: str) -> ParsedReply:
        reasoning, content = None, text
        if self.reasoning is not None:
            out = self.reasoning.extract_reasoning_content(text)
            reasoning, content = out.reasoning_content, out.content or ""
        calls: list[ToolCall] = []
        if self.tools is not None and content:
            info = self.tools.extract_tool_calls(content)
            calls, content = info.tool_calls[:None if self.parallel_tool_calls else 1], info.content
        return ParsedReply(content, reasoning, calls)

    def stream(self, delta_text: str, finished: bool) -> DeltaMessage:
        """What `delta_text` adds to the streamed message (`finished`: the reply ended, so text
        held back as a possible tag or call is released)."""
        delta, content = DeltaMessage(), delta_text
        if self.reasoning is not None:
            out = self.reasoning.extract_reasoning_content_streaming(delta_text, finished) or DeltaMessage()
            delta.reasoning_content, content = out.reasoning_content, out.content or ""
        if self.tools is None:
            delta.content = content or None
        elif out := self.tools.extract_tool_calls_streaming(content, finished):
            delta.content = out.content
            delta.tool_calls = [c for c in out.tool_calls if self.parallel_tool_calls or c.index == 0]
        return delta

    @property
    def tools_called(self) -> bool:
        """Whether the stream has sent a tool call."""
        return self.tools is not None and self.tools.tools_called
