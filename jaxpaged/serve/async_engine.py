"""`AsyncEngine`: the (thread-unsafe) `LLMEngine` owned by one background thread.

The event loop hands the thread commands (add, abort, or any call on the engine) through a
thread-safe queue; the thread drains it between steps and blocks on it when idle. Tokenizing
runs on a thread of its own (`tokenize`), so a long prompt does not hold up the steps.
Each HTTP request has an `asyncio.Queue`; the thread feeds it through
`loop.call_soon_threadsafe`. If a step raises, the engine is dead: every pending request
gets `EngineDeadError` and `/health` turns 503.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from jaxpaged.engine.llm_engine import LLMEngine
from jaxpaged.engine.outputs import RequestOutput
from jaxpaged.engine.sampling_params import SamplingParams

logger = logging.getLogger("jaxpaged.serve")
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served."""


@dataclasses.dataclass
class EngineStats:
    """A snapshot of the engine's counters, published by the engine thread after each step."""
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class Observer(Protocol):
    """Sees, in the engine thread, every output and every abort (the metrics)."""

    def observe(self, out: RequestOutput) -> None: ...

    def forget(self, request_id: str) -> None: ...


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.observer: Observer | None = None
        self.stats = EngineStats()
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="jaxpaged-engine", daemon=True)
        # Text -> ids (and the other tokenizer calls of requests) run here, not on the engine
        # thread: a huge prompt would stall every stream (the tokenizer releases the GIL).
        self._tokenizer_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxpaged-tokenizer")

    # ---- event-loop side -----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)
        if self._thread.is_alive():
            self._commands.put(None)
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` in the engine thread; its exception is raised here."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def run() -> None:
            result, error = None, self._dead_error()
            if error is None:
                try:
                    result = fn(self.engine)
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    error = e
            loop.call_soon_threadsafe(_resolve, future, result, error)

        self._commands.put(run)
        self._check_alive()  # died after the check above: nobody will run `run`
        return await future

    async def tokenize(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)`, tokenizer work that reads no engine state, off the engine thread."""
        self._check_alive()
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, fn, self.engine)

    async def add(self, request_ids: list[str], prompts: list[str | list[int]], params: SamplingParams,
                  arrival_time: float) -> RequestGroup:
        """Queue one engine request per prompt, all feeding one queue; all or none are added."""
        loop, sink = asyncio.get_running_loop(), asyncio.Queue()

        def add(engine: LLMEngine) -> list[list[int]]:
            ids = []
            try:
                for request_id, prompt in zip(request_ids, prompts):
                    ids.append(engine.add_request(request_id, prompt, params, arrival_time))
                    self._sinks[request_id] = (loop, sink)
            except BaseException:
                for request_id in request_ids[:len(ids)]:
                    self._abort(request_id)
                raise
            return ids

        try:
            prompt_ids = await self.call(add)
        except asyncio.CancelledError:  # the client left: the add still runs, so abort after it
            for request_id in request_ids:
                self.abort(request_id)
            raise
        return RequestGroup(self, request_ids, prompt_ids, sink)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks (no-op if it has finished)."""
        if self.alive:
            self._commands.put(lambda: self._abort(request_id))

    def _dead_error(self) -> EngineDeadError | None:
        if self.alive:
            return None
        return EngineDeadError(f"the engine loop is not running ({self.error!r})")

    def _check_alive(self) -> None:
        if (error := self._dead_error()) is not None:
            raise error

    # ---- engine-thread side --------------------------------------------------------------
    def _abort(self, request_id: str) -> None:
        if self._sinks.pop(request_id, None) is not None:
            self.engine.abort_request(request_id)
            if self.observer is not None:
                self.observer.forget(request_id)
            logger.info("aborted request %s", request_id)

    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                if not self._drain(block=idle):
                    return
                if self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        self._deliver(out)
                self._publish_stats()
        except BaseException as e:  # noqa: BLE001 - the loop is dead; tell everyone
            logger.exception("engine loop died")
            self.error = e
            dead = EngineDeadError(f"the engine loop died: {e!r}")
            for loop, sink in self._sinks.values():
                _put(loop, sink, dead)
            self._sinks.clear()
            self._drain(block=False)  # queued calls now report the dead engine

    def _drain(self, block: bool) -> bool:
        """Run queued commands (waiting for one if `block`); False on shutdown."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while command is not None:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
        return False

    def _deliver(self, out: RequestOutput) -> None:
        if self.observer is not None:
            self.observer.observe(out)
        target = self._sinks.get(out.request_id)
        if target is None:
            return
        if out.finished:
            del self._sinks[out.request_id]
        _put(*target, out)

    def _publish_stats(self) -> None:
        e = self.engine
        bm, sched = e.block_manager, e.scheduler
        self.stats = EngineStats(len(sched.running), len(sched.waiting), bm.usage, e.num_prompt_tokens,
                                 e.num_generation_tokens, sched.num_preemptions,
                                 bm.prefix_cache_queries, bm.prefix_cache_hits)


class RequestGroup:
    """The engine requests of one HTTP request (one per prompt) and their shared queue."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str], prompt_ids: list[list[int]],
                 sink: asyncio.Queue):
        self.engine, self.request_ids, self.prompt_ids = engine, request_ids, prompt_ids
        self._sink = sink
        self._unfinished = set(request_ids)

    async def __aiter__(self):
        """Outputs in engine order, until every request has finished."""
        while self._unfinished:
            item = await self._sink.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                self._unfinished.discard(item.request_id)
            yield item

    def abort(self) -> None:
        """Abort the requests that have not finished (client gone, or an error)."""
        for request_id in self._unfinished:
            self.engine.abort(request_id)
        self._unfinished.clear()


def _put(loop: asyncio.AbstractEventLoop, sink: asyncio.Queue, item: Any) -> None:
    try:
        loop.call_soon_threadsafe(sink.put_nowait, item)
    except RuntimeError:  # the loop has closed: nobody is listening
        pass


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
