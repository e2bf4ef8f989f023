"""The typed parts of a chat reply that the tool and reasoning parsers produce (vLLM's names):
whole tool calls for a response, and `DeltaMessage`s for a stream."""
from __future__ import annotations

import dataclasses
import uuid


def random_tool_call_id() -> str:
    """vLLM's tool-call id: `chatcmpl-tool-` and 32 hex digits."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclasses.dataclass
class FunctionCall:
    name: str
    arguments: str  # the JSON text of the arguments object


@dataclasses.dataclass
class ToolCall:
    function: FunctionCall
    id: str = dataclasses.field(default_factory=random_tool_call_id)
    type: str = "function"

    def to_json(self) -> dict:
        return {"id": self.id, "type": self.type,
                "function": {"name": self.function.name, "arguments": self.function.arguments}}


@dataclasses.dataclass
class DeltaFunctionCall:
    name: str | None = None
    arguments: str | None = None


@dataclasses.dataclass
class DeltaToolCall:
    """One streamed piece of tool call `index`: the first carries its id, type and name."""
    index: int
    function: DeltaFunctionCall
    id: str | None = None
    type: str | None = None

    def to_json(self) -> dict:
        out: dict = {"index": self.index}
        if self.id is not None:
            out.update(id=self.id, type=self.type)
        out["function"] = {k: v for k, v in dataclasses.asdict(self.function).items() if v is not None}
        return out


@dataclasses.dataclass
class DeltaMessage:
    """What one step adds to a streamed choice's message (fields left None add nothing)."""
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning_content or self.tool_calls)

    def to_json(self) -> dict:
        out: dict = {}
        if self.content:
            out["content"] = self.content
        if self.reasoning_content:
            out["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            out["tool_calls"] = [t.to_json() for t in self.tool_calls]
        return out


@dataclasses.dataclass
class ExtractedToolCallInformation:
    """A whole reply through a tool parser: its calls and the content outside them."""
    tools_called: bool
    tool_calls: list[ToolCall]
    content: str | None = None
