"""One sample's grammar state in the engine core (vLLM's `StructuredOutputRequest`): the
compiled grammar's future and, once it is compiled, an xgrammar `GrammarMatcher` that
accepts each sampled token and fills the sample's row of the step's allowed-token bitmask.

A sample whose grammar is compiling stays waiting (the scheduler does not admit it). A
sampled token the grammar does not accept (a dead end: no token was allowed) and a grammar
that has terminated both end the sample with finish reason "stop". With a reasoning parser the
grammar holds only once the reasoning has ended (`reasoning.py`).
"""
from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxpaged.engine.structured_output.compiler import import_xgrammar, usable_cpus


class StructuredOutputRequest:
    def __init__(self, grammar: concurrent.futures.Future, reasoning_end: tuple[int, ...] = (),
                 reasoning_ended: bool = True):
        self.grammar = grammar  # -> xgrammar.CompiledGrammar
        self._matcher: Any = None
        self.reasoning_end = reasoning_end  # the token ids that end reasoning (a reasoning parser's tag)
        self.reasoning_ended = reasoning_ended  # False: the grammar waits for `reasoning_end`
        self._reasoning_tail: tuple[int, ...] = ()  # the last sampled ids while reasoning

    @property
    def ready(self) -> bool:
        """The grammar is compiled (or failed: `error` says)."""
        return self.grammar.done()

    @property
    def error(self) -> BaseException | None:
        return self.grammar.exception() if self.grammar.done() else None

    @property
    def matcher(self) -> Any:
        if self._matcher is None:
            self._matcher = import_xgrammar().GrammarMatcher(self.grammar.result())
        return self._matcher

    def accept(self, token_id: int) -> bool:
        """Advance the grammar by a sampled token; False if the grammar does not allow it. A
        reasoning token only ends the reasoning (the end tag's last token) or not."""
        if not self.reasoning_ended:
            self._reasoning_tail = (self._reasoning_tail + (token_id,))[-len(self.reasoning_end):]
            self.reasoning_ended = self._reasoning_tail == self.reasoning_end
            return True
        return self.matcher.accept_token(token_id)

    @property
    def is_terminated(self) -> bool:
        return self.reasoning_ended and self.matcher.is_terminated()


def fill_threads() -> int:
    """xgrammar's threads for a step's bitmask fill: the usable CPUs but two (the engine thread
    and the dispatch worker run beside them), at most 16. The fill is the structured step's
    critical path and scales for costly states: 15.5 / 3.4 / 2.2 ms for 64 rows on 1 / 8 / 16
    threads of a 16-core H100 host; for cheap grammars (under ~1 ms on one thread) the threads
    cost more than they save (docs/structured_output.md)."""
    return max(1, min(16, usable_cpus() - 2))


@functools.cache
def _batch_matcher() -> Any:
    return import_xgrammar().BatchGrammarMatcher(max_threads=fill_threads())


def fill_grammar_bitmask(mask: np.ndarray, grammars: Sequence[StructuredOutputRequest | None]) -> None:
    """Write row i's allowed tokens into `mask[i]` (`[S, ceil(V / 32)]` int32, xgrammar's
    layout) for each row with a grammar past its reasoning; several rows at once on xgrammar's
    threads."""
    rows = [i for i, g in enumerate(grammars) if g is not None and g.reasoning_ended]
    if len(rows) == 1:
        grammars[rows[0]].matcher.fill_next_token_bitmask(mask, rows[0])
    elif rows:
        _batch_matcher().batch_fill_next_token_bitmask([grammars[i].matcher for i in rows], mask, rows)
