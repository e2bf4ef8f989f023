"""`hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call
(Hermes 2 Pro / 3, Qwen2.5, Qwen3, SmolLM3); a block may hold a JSON array of calls
(SmolLM2). Text before the first block is content; text after the last block is dropped (as
vLLM); the last block's closing tag may be missing."""
from __future__ import annotations

from jaxpaged.serve.tool_parsers import register_tool_parser
from jaxpaged.serve.tool_parsers.abstract_tool_parser import ToolParser
from jaxpaged.serve.tool_parsers.utils import (
    NotToolCall,
    PartialToolCall,
    scan_call_array,
    scan_call_object,
    skip_ws,
)


@register_tool_parser("hermes")
class Hermes2ProToolParser(ToolParser):
    start_token, end_token = "<tool_call>", "</tool_call>"
    markers = (start_token,)

    def scan_calls(self, text: str, i: int, final: bool) -> list[PartialToolCall]:
        calls: list[PartialToolCall] = []
        while True:  # i: just after a start tag
            j = skip_ws(text, i)
            if j >= len(text):
                return calls
            if text[j] not in "{[":
                raise NotToolCall("a tool_call block holds neither an object nor an array")
            if text[j] == "[":
                block, end = scan_call_array(text, j, final)
            else:
                call, end = scan_call_object(text, j, final)
                block = [call]
            calls += block
            if end is None:
                return calls
            j = skip_ws(text, end)
            rest = text[j:]
            if rest.startswith(self.end_token):
                j = skip_ws(text, j + len(self.end_token))
                rest = text[j:]
            elif rest and not rest.startswith(self.start_token) and (final or not any(
                    m.startswith(rest) for m in (self.start_token, self.end_token))):
                raise NotToolCall("text after a call inside its tool_call block")
            if not rest.startswith(self.start_token):
                return calls  # what follows the last block is dropped
            i = j + len(self.start_token)
