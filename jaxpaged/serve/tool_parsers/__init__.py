"""Tool parsers by `--tool-call-parser` name (vLLM's names): each turns a model family's
tool-call text into OpenAI `tool_calls`, whole or streamed."""
from __future__ import annotations

from jaxpaged.serve.parser_registry import ParserRegistry

TOOL_PARSERS = ParserRegistry("tool call parser")
register_tool_parser = TOOL_PARSERS.register
get_tool_parser = TOOL_PARSERS.get_parser

# the parsers register themselves when imported
from jaxpaged.serve.tool_parsers import (  # noqa: E402, F401
    granite_tool_parser,
    hermes_tool_parser,
    llama_tool_parser,
    mistral_tool_parser,
    pythonic_tool_parser,
)
