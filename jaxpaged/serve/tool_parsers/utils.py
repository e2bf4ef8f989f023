"""Scanning a model's partial output for JSON tool calls.

Every function here reads a prefix of a reply: it returns how far a value reaches, or None
when the text ends inside it (more may come), and raises `NotToolCall` as soon as the text
cannot be what was expected (the reply is then content)."""
from __future__ import annotations

import dataclasses
import json
import re

ARGUMENT_KEYS = ("arguments", "parameters")  # Llama 3.x writes "parameters"
_SCALAR = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?|true|false|null")
_NUMBER_START = re.compile(r"-?(\d+(\.\d*)?([eE][+-]?\d*)?)?")  # what may still become a number


class NotToolCall(ValueError):
    """The text cannot be (the start of) a tool call."""


@dataclasses.dataclass
class PartialToolCall:
    """A tool call as far as the text goes: its name once complete, and its arguments' JSON
    text so far (a prefix of the final text, so streamed fragments concatenate to it)."""
    name: str | None = None
    arguments: str = ""
    complete: bool = False


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker` (text held back
    in a stream, as it may still become the marker)."""
    return max((k for k in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:k])), default=0)


def expect(text: str, i: int, char: str) -> bool:
    """True if text[i] is `char`, False if the text ends at i; NotToolCall otherwise."""
    if i >= len(text):
        return False
    if text[i] != char:
        raise NotToolCall(f"expected {char!r} at {i}")
    return True


def string_end(text: str, i: int) -> int | None:
    """End of the JSON string opening at text[i]."""
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
        elif text[j] == '"':
            return j + 1
        else:
            j += 1
    return None


def _load(text: str) -> object:
    """json.loads of a complete value (NotToolCall when it is not JSON, e.g. a raw newline in a string)."""
    try:
        return json.loads(text)
    except ValueError:
        raise NotToolCall(f"not JSON: {text[:40]!r}") from None


def value_end(text: str, i: int, final: bool) -> int | None:
    """End of the JSON value starting at text[i] (brackets and strings matched; the contents
    are checked later by json.loads). A number at the very end is complete only when `final`."""
    if i >= len(text):
        return None
    if text[i] == '"':
        return string_end(text, i)
    if text[i] in "{[":
        stack, j = [], i
        while j < len(text):
            c = text[j]
            if c == '"':
                end = string_end(text, j)
                if end is None:
                    return None
                j = end
                continue
            if c in "{[":
                stack.append("}" if c == "{" else "]")
            elif c in "}]":
                if stack.pop() != c:
                    raise NotToolCall(f"unbalanced {c!r} at {j}")
                if not stack:
                    return j + 1
            j += 1
        return None
    if not final and (_NUMBER_START.match(text, i).end() == len(text)
                      or any(w.startswith(text[i:]) for w in ("true", "false", "null"))):
        return None
    if (m := _SCALAR.match(text, i)) is None:
        raise NotToolCall(f"not a JSON value at {i}")
    return m.end()


def scan_call_object(text: str, i: int, final: bool, argument_keys: tuple[str, ...] = ARGUMENT_KEYS
                     ) -> tuple[PartialToolCall, int | None]:
    """The call object `{"name": ..., "arguments": {...}}` opening at text[i] (keys in any
    order; others, such as "type" or "id", skipped): the call so far and its end (None: open)."""
    call, has_args, first, j = PartialToolCall(), False, True, skip_ws(text, i + 1)
    while True:
        if j >= len(text):
            return call, None
        if text[j] == "}":
            if call.name is None:
                raise NotToolCall("a call object without a name")
            call.complete = True
            call.arguments = call.arguments if has_args else "{}"
            return call, j + 1
        if not first:
            if not expect(text, j, ","):
                return call, None
            j = skip_ws(text, j + 1)
        first = False
        if not expect(text, j, '"') or (key_end := string_end(text, j)) is None:
            return call, None
        key, j = _load(text[j:key_end]), skip_ws(text, key_end)
        if not expect(text, j, ":"):
            return call, None
        start = skip_ws(text, j + 1)
        end = value_end(text, start, final)
        if key == "name" and end is not None:
            call.name = _load(text[start:end])
            if not isinstance(call.name, str) or not call.name:
                raise NotToolCall("a call's name must be a non-empty string")
        elif key in argument_keys and not has_args:
            if not expect(text, start, "{"):
                return call, None
            call.arguments, has_args = text[start:end if end is not None else len(text)], True
        if end is None:
            return call, None
        j = skip_ws(text, end)
        if j < len(text) and text[j] not in ",}":
            raise NotToolCall(f"unexpected {text[j]!r} in a call object")


def scan_call_array(text: str, i: int, final: bool, argument_keys: tuple[str, ...] = ARGUMENT_KEYS
                    ) -> tuple[list[PartialToolCall], int | None]:
    """A JSON array of call objects opening at text[i]: the calls so far and its end."""
    calls: list[PartialToolCall] = []
    j = skip_ws(text, i + 1)
    while True:
        if not expect(text, j, "{"):
            return calls, None
        call, end = scan_call_object(text, j, final, argument_keys)
        calls.append(call)
        if end is None:
            return calls, None
        j = skip_ws(text, end)
        if j >= len(text):
            return calls, None
        if text[j] == "]":
            return calls, j + 1
        if not expect(text, j, ","):
            return calls, None
        j = skip_ws(text, j + 1)


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def check_only_space(text: str, i: int, final: bool, markers: tuple[str, ...] = ()) -> None:
    """NotToolCall unless only spaces follow text[i:] (or, while more text may come, the start of
    one of `markers`)."""
    rest = text[skip_ws(text, i):]
    if rest and (final or not any(m.startswith(rest) for m in markers)):
        raise NotToolCall("text after the tool calls")


def scan_call_list(text: str, i: int, final: bool, argument_keys: tuple[str, ...] = ARGUMENT_KEYS
                   ) -> list[PartialToolCall]:
    """A JSON array of call objects from text[i] (after spaces), with only spaces after it."""
    j = skip_ws(text, i)
    if not expect(text, j, "["):
        return []
    calls, end = scan_call_array(text, j, final, argument_keys)
    if end is not None:
        check_only_space(text, end, final)
    return calls
