"""`mistral`: `[TOOL_CALLS]` then a JSON array of `{"name": ..., "arguments": {...}}` (Mistral
7B v0.3, Nemo, Small before 3.2), or, from tokenizer v11 on (Small 3.2, Magistral, Devstral),
`name[ARGS]{...}` with `[TOOL_CALLS]` before each call. Text before the first marker is
content. `[TOOL_CALLS]` and `[ARGS]` are special tokens: the v11 form needs
`skip_special_tokens: false`; the array form is also found without its marker. Ids are 9
letters and digits, the only ids Mistral's chat templates accept back."""
from __future__ import annotations

import random
import re
import string

from jaxpaged.serve.tool_parsers import register_tool_parser
from jaxpaged.serve.tool_parsers.abstract_tool_parser import ToolParser
from jaxpaged.serve.tool_parsers.utils import (
    NotToolCall,
    PartialToolCall,
    check_only_space,
    expect,
    partial_suffix,
    scan_call_list,
    skip_ws,
    value_end,
)

_NAME = re.compile(r"[\w.-]*")


def mistral_tool_call_id() -> str:
    return "".join(random.choices(string.ascii_letters + string.digits, k=9))


@register_tool_parser("mistral")
class MistralToolParser(ToolParser):
    bot_token, args_token = "[TOOL_CALLS]", "[ARGS]"
    markers = (bot_token,)
    bare_start = "["
    make_id = staticmethod(mistral_tool_call_id)

    def scan_calls(self, text: str, i: int, final: bool) -> list[PartialToolCall]:
        j = skip_ws(text, i)
        if j < len(text) and text[j] == "[":
            return scan_call_list(text, j, final)
        calls: list[PartialToolCall] = []
        while j < len(text):  # v11: j is at a function's name
            k = text.find(self.args_token, j)
            name = text[j:k] if k >= 0 else text[j:len(text) - partial_suffix(text, self.args_token)]
            if _NAME.fullmatch(name) is None or (k >= 0 and not name):
                raise NotToolCall("not a function name before [ARGS]")
            if k < 0:
                return calls
            start = skip_ws(text, k + len(self.args_token))
            if not expect(text, start, "{"):
                return calls + [PartialToolCall(name)]
            end = value_end(text, start, final)
            calls.append(PartialToolCall(name, text[start:end or len(text)], end is not None))
            if end is None:
                return calls
            j = skip_ws(text, end)
            if not text.startswith(self.bot_token, j):
                check_only_space(text, j, final, self.markers)
                return calls
            j += len(self.bot_token)
        return calls
