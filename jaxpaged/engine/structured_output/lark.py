"""Lark grammars as EBNF, as vLLM's xgrammar backend reads them: a `grammar` with no `::=` is
Lark's `name: expansion` rules, alternatives after `|` (also on the lines that follow). The
rule prefixes `?` and `!` are dropped, single-quoted strings double-quoted, `//` and `#`
comments dropped; the root is `start` when defined, else the first rule. Lark's directives
(`%import`, `%ignore`, ...) are refused; its regex terminals (`/[0-9]+/`) are not EBNF and
fail to compile (both a 400 naming the problem)."""
from __future__ import annotations

import re

_QUOTED = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\''
_COMMENT = re.compile(rf"({_QUOTED})|(?://|#).*$")
_RULE = re.compile(r"^[?!]?([A-Za-z_]\w*)\s*:(?!:)(.*)$")
_NOT_NAMES = re.compile(rf"{_QUOTED}|\[(?:[^\]\\]|\\.)*\]|/(?:[^/\\]|\\.)+/")  # strings, classes, regexes


def is_lark(grammar: str) -> bool:
    """vLLM's test: no line (comments dropped) defines a rule with `::=`."""
    return not any("::=" in _strip(line) for line in grammar.splitlines())


def lark_to_ebnf(grammar: str) -> str:
    """The EBNF of a Lark grammar; ValueError naming what cannot be read."""
    rules: dict[str, list[str]] = {}
    current = None
    for num, raw in enumerate(grammar.splitlines(), 1):
        line = _strip(raw)
        if not line:
            continue
        if line.startswith("%"):
            raise ValueError(f"line {num}: Lark directives ({line.split()[0]}) are not supported")
        if (m := _RULE.match(line)) is not None:
            current = m.group(1)
            if current in rules:
                raise ValueError(f"line {num}: rule {current!r} is defined twice")
            rules[current] = [_double_quoted(m.group(2).strip())]
        elif current is None:
            raise ValueError(f"line {num}: expected `name: expansion`, got {line!r}")
        elif line.startswith("|"):
            rules[current].append(_double_quoted(line[1:].strip()))
        else:  # the expansion goes on
            rules[current][-1] += " " + _double_quoted(line)
    if not rules:
        raise ValueError("the Lark grammar defines no rule")
    used = {name for alts in rules.values() for alt in alts
            for name in re.findall(r"[A-Za-z_]\w*", _NOT_NAMES.sub(" ", alt))}
    if undefined := sorted(used - set(rules)):
        raise ValueError(f"rules used but not defined: {', '.join(undefined)}")
    root = "start" if "start" in rules else next(iter(rules))
    return "\n".join([f"root ::= {root}"] + [f"{name} ::= {' | '.join(alts)}" for name, alts in rules.items()])


def _strip(line: str) -> str:
    """The line without its comment (outside quoted strings) and outer whitespace."""
    return _COMMENT.sub(lambda m: m.group(1) or "", line).strip()


def _double_quoted(text: str) -> str:
    """Lark's single-quoted strings as EBNF's double-quoted ones."""
    def requote(m: re.Match) -> str:
        s = m.group(0)
        return s if s[0] == '"' else '"' + s[1:-1].replace('"', '\\"') + '"'
    return re.sub(_QUOTED, requote, text)
