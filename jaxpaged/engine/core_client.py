"""`CoreClient`: an asyncio DEALER socket to an engine core (`core_proc`): requests out, each
step's outputs in. A core that dies is noticed however it dies: its DEAD message (a step
raised), or the socket's disconnect (the process was killed)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from jaxpaged.engine import messages as m

logger = logging.getLogger("jaxpaged")


class CoreClient:
    def __init__(self, address: str, on_outputs: Callable[[m.EngineCoreOutputs], None],
                 on_error: Callable[[str, str], None], on_dead: Callable[[str], None]):
        self.address = address
        self._on_outputs, self._on_error, self._on_dead = on_outputs, on_error, on_dead
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Connect, say HELLO, and read the core's messages in background tasks."""
        self._sock.connect(self.address)
        self.send([m.HELLO])
        self._tasks = [asyncio.ensure_future(self._read()), asyncio.ensure_future(self._watch())]

    def send(self, message: list) -> None:
        """Queue a message (never waits: no high-water mark). From the event loop: a send on a
        sync shadow of this socket could swallow the edge-triggered wake-up of `_read`."""
        self._sock.send(m.encode(message), flags=zmq.NOBLOCK)

    async def _read(self) -> None:
        try:
            while True:
                message = m.decode(await self._sock.recv())
                kind = message[0]
                if kind == m.OUTPUTS:
                    self._on_outputs(m.outputs_from_message(message))
                elif kind == m.ERROR:
                    self._on_error(message[1], message[2])
                elif kind == m.DEAD:
                    self._on_dead(message[1])
                    return
        except (asyncio.CancelledError, zmq.ContextTerminated):
            pass
        except Exception as e:  # noqa: BLE001 - a client bug would otherwise hang every request
            logger.exception("reading the engine core's messages failed")
            self._on_dead(f"reading the engine core's messages failed: {e!r}")

    async def _watch(self) -> None:
        """The connection's events: a disconnect after it connected means the core is gone."""
        connected = False
        with contextlib.suppress(asyncio.CancelledError, zmq.ContextTerminated):
            while True:
                event = parse_monitor_message(await self._monitor.recv_multipart())["event"]
                if event == zmq.EVENT_CONNECTED:
                    connected = True
                elif event == zmq.EVENT_DISCONNECTED and connected:
                    self._on_dead("the engine core process is gone (its connection closed)")
                    return

    def close(self, stop_core: bool = False) -> None:
        """Disconnect; `stop_core`: tell the core to exit first (its owner does)."""
        for task in self._tasks:
            if not task.done():
                task.cancel()
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        if stop_core:  # maybe outside the loop, and nothing reads any more: a sync send
            zmq.Socket.shadow(self._sock.underlying).send(m.encode([m.SHUTDOWN]), flags=zmq.NOBLOCK)
        self._sock.close(linger=1000 if stop_core else 0)
        self._ctx.term()
