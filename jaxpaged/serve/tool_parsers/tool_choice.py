"""`tool_choice` "required" and a named function: the JSON schema that structured output holds
the reply to (vLLM's), and the parsers of such replies (no parser flag needed: the format is
the schema's)."""
from __future__ import annotations

import copy

from jaxpaged.serve.chat_messages import ChatCompletionNamedToolChoiceParam, ChatCompletionToolsParam
from jaxpaged.serve.tool_parsers.abstract_tool_parser import ToolParser
from jaxpaged.serve.tool_parsers.utils import PartialToolCall, check_only_space, scan_call_list, value_end

EMPTY_PARAMETERS = {"type": "object", "properties": {}}  # a function without parameters takes {}


def tool_choice_schema(tools: list[ChatCompletionToolsParam] | None,
                       tool_choice: str | ChatCompletionNamedToolChoiceParam | None,
                       parallel_tool_calls: bool = True) -> dict | None:
    """The schema a reply must match, as vLLM builds it: for a named function its parameters
    (the reply is the arguments object); for "required" an array of at least one
    `{"name", "parameters"}`, one `anyOf` branch per tool, their `$defs` gathered at the top
    (at most one item when `parallel_tool_calls` is false). None for "auto" and "none"."""
    if not tools or not (tool_choice == "required" or isinstance(tool_choice, ChatCompletionNamedToolChoiceParam)):
        return None
    if isinstance(tool_choice, ChatCompletionNamedToolChoiceParam):
        function = next(t.function for t in tools if t.function.name == tool_choice.function.name)
        return copy.deepcopy(function.parameters or EMPTY_PARAMETERS)
    defs: dict[str, dict] = {}
    branches = []
    for tool in tools:
        parameters = copy.deepcopy(tool.function.parameters or EMPTY_PARAMETERS)
        for name, schema in parameters.pop("$defs", {}).items():
            if defs.setdefault(name, schema) != schema:
                raise ValueError(f"Tool definition '{name}' has multiple schemas, which is not supported.")
        branches.append({"properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                        "parameters": parameters}, "required": ["name", "parameters"]})
    schema: dict = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": branches}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


class NamedToolParser(ToolParser):
    """`tool_choice` names a function: the whole reply is its arguments object."""
    bare_start = "{"

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def scan_calls(self, text: str, i: int, final: bool) -> list[PartialToolCall]:
        end = value_end(text, i, final)
        if end is not None:
            check_only_space(text, end, final)
        return [PartialToolCall(self.name, text[i:end or len(text)], end is not None)]


class RequiredToolParser(ToolParser):
    """`tool_choice` "required": the reply is a JSON array of `{"name", "parameters"}`."""
    bare_start = "["

    def scan_calls(self, text: str, i: int, final: bool) -> list[PartialToolCall]:
        return scan_call_list(text, i, final, ("parameters",))
