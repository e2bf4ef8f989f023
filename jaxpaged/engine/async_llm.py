"""`AsyncLLM`: vLLM's asyncio engine client. The engine core runs in its own process (or a
thread); here, in the caller's process and event loop, prompts are tokenized and checked
(`Processor`), and the core's per-step token ids become text, stop strings and logprobs
(`OutputProcessor`). JAX is never imported here.

    llm = AsyncLLM.from_engine_config(EngineConfig(model=...))
    async for out in llm.generate("Hello", SamplingParams(max_tokens=8), "req-1"):
        print(out.outputs[0].text)
    await llm.abort("req-1")
    llm.shutdown()
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import multiprocessing
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypeVar

from jaxpaged.engine import messages as m
from jaxpaged.engine.config import EngineConfig
from jaxpaged.engine.core_client import CoreClient
from jaxpaged.engine.core_proc import launch_core
from jaxpaged.engine.demo import demo_dir
from jaxpaged.engine.output_processor import OutputProcessor
from jaxpaged.engine.outputs import RequestOutput
from jaxpaged.engine.processor import Processor, encode, load_tokenizer
from jaxpaged.engine.sampling_params import MAX_LOGPROBS, SamplingParams

logger = logging.getLogger("jaxpaged")
T = TypeVar("T")
LARGE_INPUT = 1 << 16  # characters or tokens: tokenizer work this large goes to its own thread


class EngineDeadError(RuntimeError):
    """The engine core has stopped; no request can be served."""


@dataclasses.dataclass
class Tokenizing:
    """What tokenizer work (`AsyncLLM.tokenize`) may use: one tokenizer per thread."""
    tokenizer: Any
    info: m.CoreInfo

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    def encode(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        return encode(self.tokenizer, prompt, add_special_tokens)


class Observer(Protocol):
    """Sees every output and every abort (the server's metrics)."""

    def observe(self, out: RequestOutput) -> None: ...

    def forget(self, request_id: str) -> None: ...


class AsyncLLM:
    def __init__(self, address: str, info: m.CoreInfo, seed: int = 0,
                 core_process: multiprocessing.Process | None = None, tokenizer: str | None = None,
                 max_logprobs: int = MAX_LOGPROBS, tokenizers: tuple[Any, Any] | None = None):
        """A client of the core serving `address` (`info`: its limits). `core_process`: the
        core's process when this client owns it (`shutdown` stops it); `tokenizer`: its folder
        when not the model's; `max_logprobs`: the most top logprobs a request may ask for;
        `tokenizers`: two copies of the tokenizer (one per tokenizer thread) if loaded already."""
        self.info, self.max_model_len = info, info.max_model_len
        tokenizer_path = tokenizer or info.model
        self.tokenizer, large = tokenizers or (load_tokenizer(tokenizer_path), load_tokenizer(tokenizer_path))
        self.processor = Processor(self.tokenizer, info, seed, max_logprobs, tokenizer_path)
        self.output = OutputProcessor(self.tokenizer)
        self.observer: Observer | None = None
        self.on_dead: Callable[[], None] | None = None  # the server exits
        self.stats = m.SchedulerStats()
        self.error: str | None = None
        self._core_process = core_process
        self._client = CoreClient(address, self._on_outputs, self._on_error, self._on_dead)
        self._started = False
        self._sinks: dict[str, asyncio.Queue] = {}
        # Text <-> ids runs off the event loop (the tokenizer releases the GIL), large inputs on a
        # thread of their own, so that a huge prompt delays neither the streams nor small prompts.
        self._lanes = [(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"jaxpaged-tokenizer{suffix}"),
                        Tokenizing(tok, info))
                       for suffix, tok in (("", self.tokenizer), ("-large", large))]

    @classmethod
    def from_engine_config(cls, config: EngineConfig, log_level: str = "info", demo: bool = False) -> AsyncLLM:
        """Start an engine-core process for `config` and a client that owns it. The tokenizers
        load (transformers' tokenizer modules take ~2 s to import on a CPU) while the core
        starts; the demo model's appear only once the core has built it, on its first start."""
        path = demo_dir() if demo else (config.tokenizer or config.model)
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxpaged-tokenizer-load") as pool:
            early = pool.submit(lambda: (load_tokenizer(path), load_tokenizer(path)))
            core = launch_core(config, log_level, demo)
            tokenizers = early.result()
        return cls(core.address, core.info, config.seed, core.process, config.tokenizer, config.max_logprobs,
                   tokenizers if tokenizers[0] is not None else None)

    # ---- requests ------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """The request's outputs as the core steps (`sampling_params.output_kind`); leaving
        the loop early aborts it."""
        if isinstance(prompt, str):
            prompt = await self.tokenize(lambda t: t.encode(prompt), len(prompt))
        group = await self.add_requests([request_id or uuid.uuid4().hex], [prompt], sampling_params)
        try:
            async for out in group:
                yield out
        finally:
            group.abort()

    async def abort(self, request_id: str) -> None:
        self.abort_request(request_id)

    async def add_requests(self, request_ids: list[str], prompts: list[str | list[int]], params: SamplingParams,
                           arrival_time: float | None = None, cache_salt: str | None = None) -> RequestGroup:
        """Send one core request per prompt, all feeding one queue; raises ValueError (nothing
        sent) if any prompt can never run. `cache_salt`: prefix-cache blocks are shared only
        with requests of the same salt (vLLM's, against prompts guessed from cache timing)."""
        await self.start()
        self._check_alive()
        if params.structured_outputs is not None:  # compiled off the event loop; `process` finds it cached
            await self.processor.structured_output_grammars().compile_async(params.structured_outputs)
        reqs = [self.processor.process(rid, p, params, arrival_time, cache_salt)
                for rid, p in zip(request_ids, prompts)]
        for rid in request_ids:
            if rid in self._sinks:
                raise ValueError(f"request id {rid!r} is already running")
        sink: asyncio.Queue = asyncio.Queue()
        for req, prompt in zip(reqs, prompts):
            self.output.add_request(req, prompt if isinstance(prompt, str) else None)
            self._sinks[req.request_id] = sink
            self._client.send([m.ADD, m.request_to_wire(req)])
        return RequestGroup(self, request_ids, [r.prompt_token_ids for r in reqs], sink)

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its blocks (no-op if it has finished); its outputs end."""
        sink = self._sinks.pop(request_id, None)
        if sink is None:
            return
        sink.put_nowait(_Aborted(request_id))
        self.output.abort(request_id)
        if self.error is None:
            self._client.send([m.ABORT, [request_id]])
        if self.observer is not None:
            self.observer.forget(request_id)
        logger.info("aborted request %s", request_id)

    async def tokenize(self, fn: Callable[[Tokenizing], T], size: int = 0) -> T:
        """Run tokenizer work `fn` on a tokenizer thread: the large-input one if `size`
        (characters or tokens) is at least `LARGE_INPUT`."""
        self._check_alive()
        thread, tokenizing = self._lanes[size >= LARGE_INPUT]
        return await asyncio.get_running_loop().run_in_executor(thread, fn, tokenizing)

    # ---- life ----------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return self._client.address

    async def start(self) -> None:
        if not self._started:
            self._started = True
            await self._client.start()

    @property
    def alive(self) -> bool:
        return self.error is None

    def fail_all(self, error: BaseException) -> None:
        """End every open request with `error` (shutdown timeout, a dead core)."""
        for request_id, sink in list(self._sinks.items()):
            sink.put_nowait(error)
            self.abort_request(request_id)

    def shutdown(self, stop_core: bool | None = None) -> None:
        """Close the connection; stop the core if this client started it (or if `stop_core`)."""
        for thread, _ in self._lanes:
            thread.shutdown(wait=False, cancel_futures=True)
        stop = self._core_process is not None if stop_core is None else stop_core
        told = stop and self._started and self.error is None
        self._client.close(stop_core=told)
        if self._core_process is not None and stop:
            if not told:
                self._core_process.terminate()
            self._core_process.join(10)
            if self._core_process.is_alive():
                self._core_process.kill()
                self._core_process.join()

    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineDeadError(self.error)

    # ---- the core's messages (event loop) ------------------------------------------------
    def _on_outputs(self, outs: m.EngineCoreOutputs) -> None:
        self.stats = outs.stats
        results, stopped = self.output.process_outputs(outs.outputs)
        if stopped:
            self._client.send([m.STOP, stopped])
        for out in results:
            if self.observer is not None:
                self.observer.observe(out)
            sink = self._sinks.get(out.request_id)
            if sink is not None:
                if out.finished:
                    del self._sinks[out.request_id]
                sink.put_nowait(out)

    def _on_error(self, request_id: str, message: str) -> None:
        sink = self._sinks.pop(request_id, None)
        self.output.abort(request_id)
        if sink is not None:
            sink.put_nowait(ValueError(message))

    def _on_dead(self, message: str) -> None:
        if self.error is not None:
            return
        self.error = message
        self.fail_all(EngineDeadError(message))
        if self.on_dead is not None:
            self.on_dead()


@dataclasses.dataclass
class _Aborted:
    """Queued after a request's last output when it is aborted."""
    request_id: str


class RequestGroup:
    """The core requests of one API request (one per prompt) and their shared queue."""

    def __init__(self, llm: AsyncLLM, request_ids: list[str], prompt_ids: list[list[int]], sink: asyncio.Queue):
        self.llm, self.request_ids, self.prompt_ids = llm, request_ids, prompt_ids
        self._sink = sink
        self._unfinished = set(request_ids)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        """Outputs in step order, until every request has finished."""
        while self._unfinished:
            item: Any = await self._sink.get()
            if isinstance(item, BaseException):
                self.abort()
                raise item
            if isinstance(item, _Aborted) or item.finished:
                self._unfinished.discard(item.request_id)
            if not isinstance(item, _Aborted):
                yield item

    def abort(self) -> None:
        """Abort the requests that have not finished (client gone, or an error)."""
        for request_id in self._unfinished:
            self.llm.abort_request(request_id)
        self._unfinished.clear()
