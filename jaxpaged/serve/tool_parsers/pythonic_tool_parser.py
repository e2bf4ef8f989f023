"""`pythonic`: a Python list of calls with keyword arguments, `[get_weather(city="Paris"),
get_time()]` (Llama 3.2 / 4, ToolACE), optionally between `<|python_start|>` and
`<|python_end|>` (text before the start tag is content; without it the reply must be the list).
Argument values are Python literals; the arguments' JSON is `json.dumps` of them.

A whole reply is parsed with `ast`; a stream with a scanner that sends each keyword argument
once its value is complete, so the pieces concatenate to the same JSON."""
from __future__ import annotations

import ast
import json
import re
import warnings

from jaxpaged.serve.chat_outputs import ExtractedToolCallInformation, FunctionCall, ToolCall
from jaxpaged.serve.tool_parsers import register_tool_parser
from jaxpaged.serve.tool_parsers.abstract_tool_parser import ToolParser
from jaxpaged.serve.tool_parsers.utils import NotToolCall, PartialToolCall, check_only_space, expect, skip_ws

_NAME = re.compile(r"[A-Za-z_][\w.]*")
_KEYWORD = re.compile(r"[A-Za-z_]\w*")


def _json_value(value: object) -> str:
    """A literal's JSON text (NotToolCall for what JSON cannot hold: sets, bytes, NaN)."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        raise NotToolCall(f"{value!r} has no JSON form") from None


def _parse(source: str) -> ast.expr:
    """An expression's tree, without the SyntaxWarnings that odd model text would log."""
    with warnings.catch_warnings(action="ignore"):
        return ast.parse(source, mode="eval").body


def _word(text: str, j: int, pattern: re.Pattern, then: str, why: str) -> tuple[str, int] | None:
    """The word `pattern` matches at text[j] (NotToolCall `why` if none) and where the `then`
    character after it is; None when the text ends first."""
    word = pattern.match(text, j)
    if word is None:
        raise NotToolCall(why)
    k = skip_ws(text, word.end())
    return (word.group(), k) if expect(text, k, then) else None


def _literal_end(text: str, i: int) -> int | None:
    """Where the Python literal from text[i] ends: at a `,` or `)` outside strings and brackets."""
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c in "'\"":
            quote = c * 3 if text.startswith(c * 3, j) else c
            j += len(quote)
            while not text.startswith(quote, j):
                if j >= len(text):
                    return None
                j += 2 if text[j] == "\\" else 1
            j += len(quote)
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                return j
            depth -= 1
        elif c == "," and depth == 0:
            return j
        j += 1
    return None


@register_tool_parser("pythonic")
class PythonicToolParser(ToolParser):
    start_token, end_token = "<|python_start|>", "<|python_end|>"
    markers = (start_token,)
    bare_start = "["

    def scan_calls(self, text: str, i: int, final: bool) -> list[PartialToolCall]:
        calls: list[PartialToolCall] = []
        j = skip_ws(text, i)
        if not expect(text, j, "["):
            return calls
        j = skip_ws(text, j + 1)
        while j < len(text):  # j: at a call's name
            if (name := _word(text, j, _NAME, "(", "not a function call")) is None:
                return calls
            call = PartialToolCall(name[0], "{")
            calls.append(call)
            j = self._scan_keywords(text, skip_ws(text, name[1] + 1), call)
            if j is None:
                return calls
            j = skip_ws(text, j)
            if j < len(text) and text[j] == "]":
                if not text.startswith(self.end_token, skip_ws(text, j + 1)):  # what follows it is dropped
                    check_only_space(text, j + 1, final, (self.end_token,))
                return calls
            if not expect(text, j, ","):
                return calls
            j = skip_ws(text, j + 1)
        return calls

    @staticmethod
    def _scan_keywords(text: str, j: int, call: PartialToolCall) -> int | None:
        """Adds `call`'s complete keyword arguments to its JSON; after its `)`, or None."""
        items = 0
        while j < len(text):
            if text[j] == ")":
                call.arguments += "}"
                call.complete = True
                return j + 1
            if (key := _word(text, j, _KEYWORD, "=", "only keyword arguments")) is None:
                return None
            eq = key[1]
            end = _literal_end(text, eq + 1)
            if end is None:
                return None
            try:
                value = ast.literal_eval(_parse(text[eq + 1:end].strip()))
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                raise NotToolCall("an argument that is not a Python literal") from None
            call.arguments += (", " if items else "") + f"{json.dumps(key[0])}: {_json_value(value)}"
            items += 1
            j = skip_ws(text, end)
            if text[j] == ",":
                j = skip_ws(text, j + 1)
        return None

    def extract_tool_calls(self, model_output: str) -> ExtractedToolCallInformation:
        content, start, body = model_output.partition(self.start_token)
        if not start:
            content, body = "", model_output
        body = body.split(self.end_token)[0].strip()
        try:
            tree = _parse(body) if body.startswith("[") else None
            if not isinstance(tree, ast.List) or not tree.elts:
                raise NotToolCall("no call list")
            calls = [self._call(node, body) for node in tree.elts]
        except (NotToolCall, SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
            return ExtractedToolCallInformation(False, [], model_output or None)
        return ExtractedToolCallInformation(True, calls, content or None)

    def _call(self, node: ast.expr, source: str) -> ToolCall:
        """One call of the list (the function's name as written in `source`)."""
        name = ast.get_source_segment(source, node.func) if isinstance(node, ast.Call) else None
        if name is None or _NAME.fullmatch(name) is None or node.args or any(k.arg is None for k in node.keywords):
            raise NotToolCall("only named functions called with keyword arguments")
        args = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        return ToolCall(FunctionCall(name, _json_value(args)), id=self.make_id())
