"""`granite`: IBM Granite 3.x, a JSON array of `{"name": ..., "arguments": {...}}` after
`<|tool_call|>` (3.0) or `<tool_call>` (3.1 and later); text before the marker is content;
without a marker (a special token dropped from the text) the reply must start with the array."""
from __future__ import annotations

from jaxpaged.serve.tool_parsers import register_tool_parser
from jaxpaged.serve.tool_parsers.abstract_tool_parser import ToolParser
from jaxpaged.serve.tool_parsers.utils import PartialToolCall, scan_call_list


@register_tool_parser("granite")
class GraniteToolParser(ToolParser):
    markers = ("<|tool_call|>", "<tool_call>")
    bare_start = "["

    def scan_calls(self, text: str, i: int, final: bool) -> list[PartialToolCall]:
        return scan_call_list(text, i, final)
