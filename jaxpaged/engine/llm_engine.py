"""`LLMEngine`: the engine core in-process, with the client's two halves around it (vLLM's
offline engine): prompts -> `Processor` -> `EngineCore` -> `OutputProcessor` -> `RequestOutput`s.
`LLM` and the benchmarks drive it; the server drives a core in its own process (`AsyncLLM`)."""
from __future__ import annotations

import concurrent.futures

from jaxpaged.engine.config import EngineConfig
from jaxpaged.engine.core import EngineCore
from jaxpaged.engine.gc_utils import freeze_gc_heap
from jaxpaged.engine.output_processor import OutputProcessor
from jaxpaged.engine.outputs import RequestOutput
from jaxpaged.engine.processor import Processor, load_tokenizer
from jaxpaged.engine.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the tokenizer loads while the core compiles
            tokenizer = pool.submit(load_tokenizer, config.tokenizer or config.model)
            self.core = EngineCore(config)
            self.tokenizer = tokenizer.result()
        self.config = self.core.config  # the platform's defaults filled in
        self.processor = Processor(self.tokenizer, self.core.info, config.seed, config.max_logprobs,
                                   config.tokenizer or config.model)
        self.output = OutputProcessor(self.tokenizer)
        # the core's parts, for benchmarks and tests
        self.model_config, self.runner, self.scheduler = self.core.model_config, self.core.runner, self.core.scheduler
        self.block_manager, self.max_model_len, self.startup = (self.core.block_manager, self.core.max_model_len,
                                                                self.core.startup)
        freeze_gc_heap()  # again: the tokenizer and the client's halves came after the core's

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None, cache_salt: str | None = None) -> list[int]:
        """Queue a request; raises ValueError (with the numbers) if it can never run. Returns
        its prompt token ids. `cache_salt`: prefix-cache blocks shared only under the same salt."""
        if request_id in self.output.states:
            raise ValueError(f"request id {request_id!r} is already running")
        req = self.processor.process(request_id, prompt, params, arrival_time, cache_salt)
        self.core.add_request(req)
        self.output.add_request(req, prompt if isinstance(prompt, str) else None)
        return req.prompt_token_ids

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its blocks (unknown or finished ids are ignored)."""
        self.output.abort(request_id)
        self.core.abort_requests([request_id])

    def has_unfinished_requests(self) -> bool:
        return self.output.has_unfinished_requests() or self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """One core step; its outputs as the client sees them."""
        results, stopped = self.output.process_outputs(self.core.step().outputs)
        if stopped:
            self.core.finish_stopped(stopped)
        return results
