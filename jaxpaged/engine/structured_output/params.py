"""`StructuredOutputsParams`: the one constraint a request's output must follow (vLLM's name
and fields), with the checks that need no grammar engine.

Exactly one of `json` (a JSON schema), `regex`, `choice`, `grammar` (EBNF / GBNF),
`json_object` or `structural_tag` (xgrammar's structural tag: vLLM's `{"structures": [{"begin",
"schema", "end"}], "triggers"}`, or its `{"type": "structural_tag", "format"}`) is set. Whitespace in JSON is compact unless `disable_any_whitespace=False`
(vLLM allows any whitespace by default; here a model cannot loop on spaces by default).
"""
from __future__ import annotations

import dataclasses
import json as jsonlib
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclasses.dataclass
class StructuredOutputsParams:
    json: str | dict[str, Any] | None = None  # a JSON schema (a dict or its JSON text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (GBNF) with a `root` rule
    json_object: bool | None = None  # any JSON object
    structural_tag: str | dict[str, Any] | None = None  # a structural tag (a dict or its JSON text)
    disable_any_whitespace: bool = True  # JSON: compact (one space after `:` and `,`), no free whitespace

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured outputs need exactly one of json, regex, choice, grammar, "
                             f"json_object or structural_tag; got {given or 'none'}")
        for name, what in (("json", "the JSON schema"), ("structural_tag", "the structural tag")):
            if isinstance(getattr(self, name), str):
                try:
                    setattr(self, name, jsonlib.loads(getattr(self, name)))
                except ValueError as e:
                    raise ValueError(f"{what} is not valid JSON: {e}") from None
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise ValueError(f"{what} must be an object, got {type(getattr(self, name)).__name__}")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"structured outputs' {name} must be a string")
        if self.choice is not None:
            if not isinstance(self.choice, list) or not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured outputs' choice must be a non-empty list of strings")
        if self.json_object not in (None, True):
            raise ValueError("structured outputs' json_object must be true when given")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str, bool]:
        """What the compiled grammar depends on: (kind, spec as text, any whitespace); the
        cache key of compiled grammars."""
        value = getattr(self, self.kind)
        spec = value if isinstance(value, str) else jsonlib.dumps(value, separators=(",", ":"), ensure_ascii=False)
        return self.kind, spec, not self.disable_any_whitespace

    def describe(self, limit: int = 120) -> str:
        """The constraint for an error message: its kind and the start of its spec."""
        kind, spec, _ = self.key
        name = {"json": "JSON schema", "json_object": "JSON object", "structural_tag": "structural tag"}.get(kind, kind)
        return f"{name} {spec[:limit] + ('...' if len(spec) > limit else '')!r}" if kind != "json_object" else name
