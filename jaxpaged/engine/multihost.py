"""Serving across processes (tensor parallelism over several hosts): process 0 runs the
engine core that the HTTP server talks to, every other process runs the same core as a follower.

The core is SPMD: every process must add, abort and stop the same requests between the same
steps, and then computes the same outputs. So process 0's core is wrapped in a `Leader`
that records each of these and, before each step, sends what it recorded to the
others (one message per step, and a last one when the server stops); a `follow`ing process
applies each message and steps too. The messages go through the JAX coordination service's
key-value store, not a device collective: the steps' own collectives are issued by the
runner's dispatch thread, and every process must issue its collectives in one order.
"""
from __future__ import annotations

import logging
import pickle
from typing import Any

import jax
from jax._src import distributed  # the coordination service's client, as jax.experimental.multihost_utils uses it

from jaxpaged.engine.core import EngineCore
from jaxpaged.engine.messages import EngineCoreOutputs, EngineCoreRequest

logger = logging.getLogger("jaxpaged")
STEP, STOP = "step", "stop"
KEEP = 64  # messages kept in the store; followers are at most ~2 steps behind (the steps' collectives)


class Channel:
    """Process 0's messages to every other process, in order (key `jaxpaged/step/<n>`)."""

    def __init__(self, poll_ms: int = 60_000):
        self._client = distributed.global_state.client
        if self._client is None:
            raise RuntimeError("jax.distributed is not initialized")
        self._seq, self._poll_ms = 0, poll_ms

    def send(self, message: Any) -> None:
        self._client.key_value_set_bytes(f"jaxpaged/step/{self._seq}", pickle.dumps(message))
        if self._seq >= KEEP:
            self._client.key_value_delete(f"jaxpaged/step/{self._seq - KEEP}")
        self._seq += 1

    def receive(self) -> Any:
        """The next message; waits as long as process 0 is idle (and dies with it)."""
        while True:
            try:
                data = self._client.blocking_key_value_get_bytes(f"jaxpaged/step/{self._seq}", self._poll_ms)
                break
            except Exception as e:  # noqa: BLE001 - XLA's runtime error; only a timeout is retried
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise
        self._seq += 1
        return pickle.loads(data)


class Leader:
    """Process 0's core: `EngineCore`'s interface; adds, aborts and stops are recorded and sent
    to the followers with the next step."""

    def __init__(self, core: EngineCore, channel: Channel):
        self._core, self._channel = core, channel
        self._events: list[tuple] = []

    def __getattr__(self, name: str) -> Any:  # everything else reads the core
        return getattr(self._core, name)

    def add_request(self, req: EngineCoreRequest) -> None:
        self._core.add_request(req)
        self._events.append(("add_request", req))  # only requests process 0 accepted

    def abort_requests(self, request_ids: list[str]) -> None:
        self._core.abort_requests(request_ids)
        self._events.append(("abort_requests", request_ids))

    def finish_stopped(self, stopped: list[tuple[str, int, str]]) -> None:
        self._core.finish_stopped(stopped)
        self._events.append(("finish_stopped", stopped))

    def step(self) -> EngineCoreOutputs:
        self._send(STEP)
        return self._core.step()

    def stop(self) -> None:
        """Let the followers exit (after any aborts of the server's last requests)."""
        self._send(STOP)

    def _send(self, action: str) -> None:
        events, self._events = self._events, []
        self._channel.send((events, action))


def follow(core: EngineCore, channel: Channel) -> None:
    """A process other than 0: mirror process 0's requests and steps until it stops."""
    logger.info("process %d follows process 0's requests", jax.process_index())
    while True:
        events, action = channel.receive()
        for method, arg in events:
            getattr(core, method)(arg)
        if action == STOP:
            return
        core.step()
