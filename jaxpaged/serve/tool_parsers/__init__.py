"""Tool parsers by `--tool-call-parser` name (vLLM's names): each turns a model family's
tool-call text into OpenAI `tool_calls`, whole or streamed."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxpaged.serve.tool_parsers.abstract_tool_parser import ToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {}


def register_tool_parser(name: str):
    """Class decorator: the parser answers to `--tool-call-parser name`."""
    def register(cls: type[ToolParser]) -> type[ToolParser]:
        TOOL_PARSERS[name] = cls
        return cls
    return register


def get_tool_parser(name: str) -> type[ToolParser]:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}: one of {', '.join(sorted(TOOL_PARSERS))}")
    return TOOL_PARSERS[name]


# the parsers register themselves when imported
from jaxpaged.serve.tool_parsers import (  # noqa: E402, F401
    granite_tool_parser,
    hermes_tool_parser,
    llama_tool_parser,
    mistral_tool_parser,
    pythonic_tool_parser,
)
