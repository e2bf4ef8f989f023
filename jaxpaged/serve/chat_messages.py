"""The chat history's request schemas (OpenAI's, as vLLM takes them): messages with text
content, an assistant's tool calls, a tool's answer; the functions offered and a named
`tool_choice`."""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ChatModel(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class FunctionDefinition(ChatModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of type object
    strict: bool | None = None

    @model_validator(mode="after")
    def _object_parameters(self) -> FunctionDefinition:
        if self.parameters is not None and self.parameters.get("type", "object") != "object":
            raise ValueError(f"the parameters of function `{self.name}` must be a JSON schema of type "
                             f"object, got type {self.parameters['type']!r}")
        return self


class ChatCompletionToolsParam(ChatModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionNamedFunction(ChatModel):
    name: str


class ChatCompletionNamedToolChoiceParam(ChatModel):
    type: Literal["function"] = "function"
    function: ChatCompletionNamedFunction


class FunctionCallParam(ChatModel):
    name: str
    arguments: dict[str, Any]  # JSON text in the API; a dict for the chat template, as HF templates expect

    @field_validator("arguments", mode="before")
    @classmethod
    def _parse_arguments(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("must be the JSON text of an object") from None
        return value


class ChatCompletionMessageToolCallParam(ChatModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallParam


class ChatMessage(ChatModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ChatCompletionMessageToolCallParam] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    reasoning_content: str | None = None  # an assistant's reasoning (templates such as Qwen3's read it)

    @model_validator(mode="after")
    def _check_tool_fields(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"only assistant messages have `tool_calls`, not {self.role} messages")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs `tool_call_id`")
        return self

    def text(self) -> str:
        """The content as one string; only text parts are supported."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported by jaxpaged")
            parts.append(part["text"])
        return "".join(parts)

    def template_message(self) -> dict[str, Any]:
        """The message as chat templates read it: text content, tool calls with dict arguments."""
        message = {"role": self.role, "content": self.text(),
                   **self.model_dump(include={"name", "tool_call_id", "reasoning_content"}, exclude_none=True)}
        if self.tool_calls is not None:
            message["tool_calls"] = [c.model_dump(include={"id", "type", "function"}) for c in self.tool_calls]
        return message
