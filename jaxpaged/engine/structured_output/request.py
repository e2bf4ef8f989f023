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
import time
from collections.abc import Callable, Sequence
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
    """xgrammar's threads for a step's bitmask fill of costly grammar states: the usable CPUs
    but two (the engine thread and the dispatch worker run beside them), at most 16. 64 rows of
    costly states take 15.5 / 3.4 / 2.2 ms on 1 / 8 / 16 threads of a 16-core H100 host."""
    return max(1, min(16, usable_cpus() - 2))


@functools.cache
def _batch_matcher(threads: int) -> Any:
    return import_xgrammar().BatchGrammarMatcher(max_threads=threads)


def _xgrammar_fill(matchers: list, mask: np.ndarray, rows: list[int], threads: int) -> None:
    _batch_matcher(threads).batch_fill_next_token_bitmask(matchers, mask, rows)


class BitmaskFiller:
    """Fills a step's rows on one thread while that costs no more than xgrammar's
    `fill_threads()` would: their start-up costs more than cheap grammar states do (64 rows of
    a JSON-objects schema: 0.22-0.65 ms alone on one thread, 1.8-2.2 ms on 14 in the engine, H100).

    One thread takes the rows in growing chunks (`first_chunk` rows, then 4x more each time)
    while the fill's CPU time, with the next chunk at the rate so far, stays within the budget:
    the threads' wall time per fill (a moving average; `budget_s` until they have run). Past
    it, the rest of the rows and the next `recheck_every` fills go to the threads (a costly
    grammar's retry overshoots by at most about one chunk's misjudged cost). CPU time, because
    beside the engine thread the wall time includes waits for the GIL; chunks, because a probe
    of a few rows scaled to the batch misjudged it (the H100's objects fill stayed on the
    threads). Each chunk is one
    xgrammar batch call: a call per row may wait for the GIL at every row beside the engine
    thread's Python (16 cheap rows: 0.02 ms alone; beside a busy Python thread 0.47-1.46 ms a
    call per row, 0.02-0.66 ms as one batch call; CPU, docs/decisions.md)."""

    def __init__(self, budget_s: float = 1e-3, recheck_every: int = 16, first_chunk: int = 4,
                 fill: Callable[[list, np.ndarray, list[int], int], None] = _xgrammar_fill, threads: int | None = None):
        self.budget_s = budget_s  # the threads' wall time per fill, once measured
        self.recheck_every, self.first_chunk = recheck_every, first_chunk
        self.fill = fill  # (matchers, mask, rows, threads)
        self.threads = threads or fill_threads()  # read once: the CPU quota is files in /sys
        self._threaded_fills_left = 0

    def __call__(self, mask: np.ndarray, grammars: Sequence[StructuredOutputRequest | None]) -> None:
        rows = [i for i, g in enumerate(grammars) if g is not None and g.reasoning_ended]
        if not rows:
            return

        def part(some: list[int], threads: int) -> None:
            if some:
                self.fill([grammars[i].matcher for i in some], mask, some, threads)

        if self._threaded_fills_left > 0:
            self._threaded_fills_left -= 1
            t = time.perf_counter()
            part(rows, self.threads)
            self.budget_s += 0.25 * (time.perf_counter() - t - self.budget_s)
            return
        t0, done, chunk = time.thread_time(), 0, self.first_chunk
        while done < len(rows):
            part(rows[done:done + chunk], 1)
            done, chunk = done + chunk, 4 * chunk
            spent = time.thread_time() - t0
            if spent * (1 + min(chunk, len(rows) - done) / done) > self.budget_s:  # with the next chunk at
                self._threaded_fills_left = self.recheck_every  # this rate, dearer than the threads
                return part(rows[done:], self.threads)


# fill_grammar_bitmask(mask, grammars): row i's allowed tokens into `mask[i]` (`[S, ceil(V / 32)]`
# int32, xgrammar's layout) for each row with a grammar past its reasoning.
fill_grammar_bitmask = BitmaskFiller()
