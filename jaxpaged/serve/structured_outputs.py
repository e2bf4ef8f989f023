"""The request fields that ask for structured output, as OpenAI and vLLM spell them, and their
mapping to the engine's `StructuredOutputsParams`:

- `response_format`: `{"type": "json_object"}` or `{"type": "json_schema", "json_schema":
  {"name", "schema", "strict"}}` (OpenAI's; `{"type": "text"}` asks for nothing), or vLLM's
  `{"type": "structural_tag", "structures": [{"begin", "schema", "end"}], "triggers"}` /
  `{"type": "structural_tag", "format"}`;
- `structured_outputs`: vLLM's object `{json | regex | choice | grammar | json_object |
  structural_tag, disable_any_whitespace}`;
- `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`: vLLM's older names.

At most one of them per request; the spec itself is checked when it compiles (a 400 naming it).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jaxpaged.engine.structured_output.params import KINDS, StructuredOutputsParams

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
OPTIONS = ("disable_any_whitespace",)


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema` (`strict` asks for what is always done here: the
    output follows the schema)."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class StructuralTag(BaseModel):
    """vLLM's structural tag structure: text from `begin` to `end` whose content follows `schema`."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    begin: str
    tag_schema: dict[str, Any] = Field(alias="schema")
    end: str


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    structures: list[StructuralTag] | None = None  # structural_tag: vLLM's form, with `triggers`
    triggers: list[str] | None = None
    format: dict[str, Any] | None = None  # structural_tag: xgrammar's form

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("`json_schema` must be given exactly when the type is json_schema")
        tag_forms = (self.structures is not None and self.triggers is not None, self.format is not None)
        if self.type == "structural_tag" and sum(tag_forms) != 1:
            raise ValueError("a structural_tag response_format needs `structures` and `triggers`, or `format`")
        if self.type != "structural_tag" and (self.structures, self.triggers, self.format) != (None, None, None):
            raise ValueError("`structures`, `triggers` and `format` belong to the structural_tag type")
        return self


class StructuredOutputFields(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # as protocol.OpenAIModel
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @model_validator(mode="after")
    def _one_form(self) -> StructuredOutputFields:
        forms = self._forms()
        if len(forms) > 1:
            raise ValueError(f"give at most one structured output form; got {', '.join(forms)}")
        if self.structured_outputs is not None:
            unknown = sorted(set(self.structured_outputs) - set(KINDS) - set(OPTIONS))
            if unknown:
                raise ValueError(f"structured_outputs: unsupported field(s) {unknown}; jaxpaged supports "
                                 f"{', '.join(KINDS + OPTIONS)}")
        return self

    def _forms(self) -> list[str]:
        rf = self.response_format
        forms = ["response_format"] if rf is not None and rf.type != "text" else []
        return forms + [name for name in ("structured_outputs", *GUIDED) if getattr(self, name) is not None]

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The engine's constraint (ValueError if the form is malformed), or None."""
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if rf is not None and rf.type == "json_schema":
            return StructuredOutputsParams(json=rf.json_schema.json_schema)
        if rf is not None and rf.type == "structural_tag":
            return StructuredOutputsParams(structural_tag=rf.model_dump(by_alias=True, exclude_none=True))
        if self.structured_outputs is not None:
            return StructuredOutputsParams(**self.structured_outputs)
        for name, kind in GUIDED.items():
            if (value := getattr(self, name)) is not None:
                return StructuredOutputsParams(**{kind: value})
        return None
