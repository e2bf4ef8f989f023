"""`StructuredOutputManager` (vLLM V1's name): the engine core's side of structured output.
It hands each sample of a structured request its grammar (compiling on the compiler's threads
while the sample waits), with its reasoning state when a reasoning parser is set, and reports
the samples whose grammar failed to compile."""
from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence

from jaxpaged.engine.request import Request
from jaxpaged.engine.structured_output.compiler import get_grammar_compiler
from jaxpaged.engine.structured_output.params import StructuredOutputsParams
from jaxpaged.engine.structured_output.reasoning import ReasoningTokens
from jaxpaged.engine.structured_output.request import StructuredOutputRequest


class StructuredOutputManager:
    """Grammars for one model's requests. `wait_for_grammars`: `add_request` returns once the
    grammar is compiled (several processes must admit a sample at the same step); `reasoning`:
    the reasoning parser's tags, whose end the grammars wait for."""

    def __init__(self, tokenizer_path: str, vocab_size: int, stop_token_ids: tuple[int, ...],
                 wait_for_grammars: bool = False, reasoning: ReasoningTokens | None = None):
        self.compiler = get_grammar_compiler(tokenizer_path, vocab_size, stop_token_ids)
        self.wait_for_grammars = wait_for_grammars
        self.reasoning = reasoning
        self.compiling: list[Request] = []  # samples whose grammar may still be compiling

    def add_request(self, params: StructuredOutputsParams, samples: Sequence[Request]) -> None:
        grammar = self.compiler.submit(params)
        if self.wait_for_grammars:
            concurrent.futures.wait([grammar])
        r = self.reasoning
        for seq in samples:
            seq.structured_output = StructuredOutputRequest(grammar, r.end_ids if r else (),
                                                            r is None or r.ended(seq.prompt_token_ids))
            self.compiling.append(seq)

    def failed(self) -> list[Request]:
        """Forget the samples whose grammar is done; those whose grammar failed, unfinished
        (the client compiles a spec before sending it, so only a core-side failure is here)."""
        failed = [s for s in self.compiling if s.structured_output.error is not None and not s.is_finished]
        self.compiling = [s for s in self.compiling if not s.structured_output.ready]
        return failed

    def wait(self, timeout: float) -> None:
        """Until a compiling grammar is done or `timeout` s pass (an idle engine, not spinning)."""
        concurrent.futures.wait([s.structured_output.grammar for s in self.compiling], timeout,
                                concurrent.futures.FIRST_COMPLETED)
