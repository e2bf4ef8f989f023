"""`llama3_json`: Llama 3.1 / 3.2's JSON calls, `{"name": ..., "parameters": {...}}` (or
"arguments"), several separated by `;`, after an optional `<|python_tag|>` (text before the
tag is content; without it the reply must start with the call)."""
from __future__ import annotations

from jaxpaged.serve.tool_parsers import register_tool_parser
from jaxpaged.serve.tool_parsers.abstract_tool_parser import ToolParser
from jaxpaged.serve.tool_parsers.utils import PartialToolCall, expect, scan_call_object, skip_ws


@register_tool_parser("llama3_json")
class Llama3JsonToolParser(ToolParser):
    markers = ("<|python_tag|>",)
    bare_start = "{"

    def scan_calls(self, text: str, i: int, final: bool) -> list[PartialToolCall]:
        calls: list[PartialToolCall] = []
        j = skip_ws(text, i)
        while expect(text, j, "{"):
            call, end = scan_call_object(text, j, final)
            calls.append(call)
            if end is None:
                break
            j = skip_ws(text, end)
            if not expect(text, j, ";"):
                break
            j = skip_ws(text, j + 1)
        return calls
