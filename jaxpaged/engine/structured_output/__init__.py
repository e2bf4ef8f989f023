"""Structured output (vLLM V1's module): a request's output constrained by a JSON schema, a
regex, a choice, an EBNF (or Lark) grammar or a structural tag, compiled by xgrammar into a
per-step allowed-token bitmask.

    params.py     `StructuredOutputsParams`: the request's constraint, checked
    compiler.py   xgrammar compilation: a thread pool, a cache by spec, a timeout
    lark.py       Lark grammars as EBNF
    request.py    per sample: the grammar matcher; the bitmask rows of a step
    reasoning.py  a reasoning parser's think tags: the grammar holds after the reasoning
"""
from jaxpaged.engine.structured_output.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
