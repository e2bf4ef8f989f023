"""The engine core behind a ZeroMQ ROUTER socket: its own process (the server's), or a thread.

    loop: receive new, aborted and stopped requests (block while idle) -> EngineCore.step()
          -> one msgpack message per client per step: its samples' new token ids and logprobs

Clients are DEALER sockets (`core_client.CoreClient`), one per API server process; each step's
outputs go to the client that added the request, the step's stats to every client. If a step
raises, every client gets a DEAD message and the process exits non-zero. JAX is imported only
in the process that runs the core (`run_engine_core`), never by a client that starts it.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import uuid
from typing import TYPE_CHECKING

import zmq

from jaxpaged.engine import messages as m
from jaxpaged.engine.config import EngineConfig

if TYPE_CHECKING:
    from jaxpaged.engine.core import EngineCore

logger = logging.getLogger("jaxpaged")
IDLE_POLL_MS = 1000  # while idle, how often the core checks that the process that started it lives


def new_address() -> str:
    """A fresh IPC endpoint in the temp directory."""
    return f"ipc://{tempfile.gettempdir()}/jaxpaged-core-{uuid.uuid4().hex[:12]}"


class EngineCoreProc:
    def __init__(self, core: EngineCore, address: str, parent_pid: int | None = None):
        self.core, self.address, self.parent_pid = core, address, parent_pid
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.bind(address)
        self._clients: list[bytes] = []
        self._owner: dict[str, bytes] = {}  # request id -> the client that added it
        self._changed = False  # a message changed the core's state since the last send

    def run(self) -> None:
        """Serve until a client sends SHUTDOWN or the parent process is gone."""
        try:
            while self._receive(block=not self.core.has_unfinished_requests()):
                if self.core.has_unfinished_requests():
                    self._send(self.core.step())
                elif self._changed:  # e.g. the last request was aborted: fresh stats, no step
                    self._send(m.EngineCoreOutputs([], self.core.stats()))
        except BaseException as e:  # noqa: BLE001 - tell every client, then die
            logger.exception("engine core died")
            for client in self._clients:
                self._sock.send_multipart([client, m.encode([m.DEAD, f"the engine core died: {e!r}"])])
            raise
        finally:
            self._sock.close(linger=1000)
            self._ctx.term()

    def _receive(self, block: bool) -> bool:
        """Apply every queued message (waiting for one if `block`); False on shutdown."""
        while block and not self._sock.poll(IDLE_POLL_MS):
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                logger.info("the process that started the engine core is gone: exiting")
                return False
        while True:
            try:
                client, data = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            message = m.decode(data)
            kind = message[0]
            self._changed = True
            if kind == m.ADD:
                req = m.request_from_wire(message[1])
                try:
                    self.core.add_request(req)
                    self._owner[req.request_id] = client
                except ValueError as e:
                    self._sock.send_multipart([client, m.encode([m.ERROR, req.request_id, str(e)])])
            elif kind == m.ABORT:
                self.core.abort_requests(message[1])
                self._forget(message[1])
            elif kind == m.STOP:
                self.core.finish_stopped([tuple(s) for s in message[1]])
                self._forget([s[0] for s in message[1]])
            elif kind == m.HELLO:
                self._clients.append(client)
            elif kind == m.SHUTDOWN:
                return False

    def _forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if request_id not in self.core.requests:
                self._owner.pop(request_id, None)

    def _send(self, outs: m.EngineCoreOutputs) -> None:
        """Each client's outputs of the step (and the stats), one message each."""
        self._changed = False
        mine: dict[bytes, list[m.EngineCoreOutput]] = {client: [] for client in self._clients}
        for o in outs.outputs:
            client = self._owner.get(o.request_id)
            if client is not None:
                mine.setdefault(client, []).append(o)
        self._forget([o.request_id for o in outs.outputs if o.finish_reason is not None])
        for client, outputs in mine.items():
            self._sock.send_multipart([client, m.outputs_message(m.EngineCoreOutputs(outputs, outs.stats))])


def run_engine_core(config: EngineConfig, address: str, ready, parent_pid: int, log_level: str,
                    demo: bool) -> None:
    """The engine-core process: build the core (the demo model first, if `demo`), report
    `CoreInfo` (or the error) on `ready`, then serve `address`."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the API server stops the core
    from jaxpaged.engine.core import EngineCore
    from jaxpaged.engine import demo as demo_model

    try:
        if demo:
            config = dataclasses.replace(config, model=str(demo_model.demo_model_dir()))
        core = EngineCore(config)
    except (ValueError, OSError) as e:
        ready.send(("error", str(e)))
        sys.exit(1)
    s, cfg = core.startup, core.model_config
    logger.info("loaded %s (%s, %d layers, vocab %d) in %.1f s", config.model, cfg.architecture, cfg.num_layers,
                cfg.vocab_size, s["load_s"])
    logger.info("KV cache: %d blocks x %d = %d tokens; max_model_len %d", s["num_kv_blocks"], config.block_size,
                s["kv_capacity_tokens"], core.max_model_len)
    logger.info("compiled token buckets %s in %.1f s; engine core process %d", s["buckets"], s["warmup_s"], os.getpid())
    proc = EngineCoreProc(core, address, parent_pid)
    ready.send(("ready", dataclasses.astuple(core.info)))
    if config.num_processes > 1:
        from jaxpaged.engine.multihost import Channel, Leader
        proc.core = Leader(core, Channel())
    try:
        proc.run()
    finally:
        if config.num_processes > 1:
            proc.core.stop()


@dataclasses.dataclass
class CoreProcess:
    process: multiprocessing.Process
    address: str
    info: m.CoreInfo


def launch_core(config: EngineConfig, log_level: str = "info", demo: bool = False) -> CoreProcess:
    """Start the engine-core process and wait until it serves (spawned: it imports JAX, the
    caller need not). Raises ValueError with the core's message if it cannot start."""
    ctx = multiprocessing.get_context("spawn")
    theirs, ours = ctx.Pipe(duplex=False)
    address = new_address()
    proc = ctx.Process(target=run_engine_core, name="jaxpaged-engine-core", daemon=True,
                       args=(config, address, ours, os.getpid(), log_level, demo))
    proc.start()
    ours.close()
    try:
        reply = theirs.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"the engine core exited during start-up (exit code {proc.exitcode})") from None
    if reply[0] == "error":
        proc.join()
        raise ValueError(reply[1])
    return CoreProcess(proc, address, m.CoreInfo(*reply[1]))


def start_core_thread(core: EngineCore) -> tuple[str, threading.Thread]:
    """Serve `core` from a thread of this process (tests, notebooks): its address and thread."""
    proc = EngineCoreProc(core, new_address())
    thread = threading.Thread(target=proc.run, name="jaxpaged-engine-core", daemon=True)
    thread.start()
    return proc.address, thread


def stop_core_thread(address: str, thread: threading.Thread) -> None:
    """End `start_core_thread`'s loop."""
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 1000)  # a dead core takes nothing: do not wait for it
        sock.connect(address)
        sock.send(m.encode([m.SHUTDOWN]))
        thread.join(timeout=30)
