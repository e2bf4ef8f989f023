"""What the model runner hands back: a launched step (`Launched`, dispatched, not yet waited
for) and its results on the host (`ModelRunnerOutput`, vLLM V1's name)."""
from __future__ import annotations

import concurrent.futures
import dataclasses

import numpy as np

from jaxpaged.engine.input_builder import LateSampling
from jaxpaged.engine.messages import PromptLogprobsChunk
from jaxpaged.engine.scheduler_output import ScheduledRequest
from jaxpaged.engine.step_programs import PromptLogprobsOutput


@dataclasses.dataclass
class Launched:
    """A launched step: its rows, where their tokens start in the batch, and the future of the
    dispatch's device outputs; `ModelRunner.fetch` turns it into a `ModelRunnerOutput`."""
    rows: list[ScheduledRequest]
    token_offsets: np.ndarray  # [S + 1]
    outputs: concurrent.futures.Future  # (device SamplerOutput, PromptLogprobsOutput | None, or num_emitted)
    multi_step: bool = False
    speculative: bool = False  # the verify head ran: rows emitted 1..k + 1 tokens (`num_emitted`)
    late: LateSampling | None = None  # launched late (`launches_late`): its sampling inputs, for `hand_over`
    sampling: concurrent.futures.Future | None = None  # -> LateHeadInputs: the head waits for them


@dataclasses.dataclass
class ModelRunnerOutput:
    """A step's results on the host, per row i of `rows`: its `rows[i].num_sampled` (0..K)
    sampled token ids `token_ids[:num_sampled, i]` with their raw logprobs and ranks, the top-N
    logprobs when the variant computes them, and the prompt logprobs of the step's tokens
    (rows `token_offsets[i] ..` of `prompt_logprobs`)."""
    rows: list[ScheduledRequest]
    token_offsets: np.ndarray  # [S + 1]
    token_ids: np.ndarray  # [K, S] i32
    logprobs: np.ndarray  # [K, S] f32
    ranks: np.ndarray  # [K, S] i32
    top_ids: np.ndarray | None = None  # [K, S, N]
    top_logprobs: np.ndarray | None = None  # [K, S, N]
    prompt_logprobs: PromptLogprobsOutput | None = None
    num_emitted: np.ndarray | None = None  # [S] a speculative step's tokens per row (else num_sampled)

    def prompt_chunk(self, i: int, start: int, n: int, num_prompt: int) -> PromptLogprobsChunk | None:
        """Row i's prompt logprobs: its `n` tokens from prompt position `start`, those that have
        a next prompt token (None: none has)."""
        n = min(n, num_prompt - 1 - start)
        if n <= 0 or self.prompt_logprobs is None:
            return None
        p, a = self.prompt_logprobs, int(self.token_offsets[i])
        return PromptLogprobsChunk(start, p.logprobs[a:a + n].tolist(), p.ranks[a:a + n].tolist(),
                                   p.top_ids[a:a + n].tolist(), p.top_logprobs[a:a + n].tolist())
