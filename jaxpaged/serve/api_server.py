"""One API server process: the app over an `AsyncLLM`, under uvicorn, with the lifecycle rules.

- SIGTERM: stop accepting, let open requests finish for at most `shutdown_timeout` seconds,
  then end the remaining streams with an error event (a client that does not read is cut
  a few seconds later), and exit.
- The engine core dies: /health turns 503, open streams end with an error event, new
  requests get 503, and the process exits with status 1 so a supervisor restarts it.

`--api-server-count N` runs N of these on one listening socket (`run_api_server`, spawned by
the CLI); none imports JAX.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import sys

import uvicorn

from jaxpaged.engine.async_llm import AsyncLLM, EngineDeadError
from jaxpaged.engine.gc_utils import freeze_gc_heap
from jaxpaged.engine.generation_config import GenerationDefaults
from jaxpaged.engine.messages import CoreInfo
from jaxpaged.engine.sampling_params import MAX_LOGPROBS
from jaxpaged.serve.app import build_app
from jaxpaged.serve.middleware import CORS

logger = logging.getLogger("jaxpaged.serve")
CUT_AFTER_S = 3  # after the error events, how long a stream that is not being read may stay open
DEAD_EXIT_DELAY_S = 2.0  # after the core died: time for the error events (and 503s) to go out


@dataclasses.dataclass
class SSL:
    """`--ssl-keyfile`, `--ssl-certfile`, `--ssl-ca-certs`, `--ssl-cert-reqs`: uvicorn's TLS."""
    keyfile: str | None = None
    certfile: str | None = None
    ca_certs: str | None = None
    cert_reqs: int = 0  # ssl.CERT_NONE: no client certificate asked


@dataclasses.dataclass
class ServerSettings:
    served_names: list[str]
    model_path: str
    host: str = "0.0.0.0"
    port: int = 8000
    chat_template: str | None = None
    api_key: str | None = None
    max_request_body_size: int | None = None
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    cors: CORS | None = None
    tokenizer: str | None = None  # its folder when not the model's
    max_logprobs: int = MAX_LOGPROBS
    generation_defaults: GenerationDefaults | None = None
    log_requests: bool = False
    max_log_len: int | None = None
    docs: bool = True  # /openapi.json and /docs
    uvicorn_log_level: str = "info"
    ssl: SSL | None = None
    trust_request_chat_template: bool = False
    tool_parser: str | None = None  # --tool-call-parser, given with --enable-auto-tool-choice
    reasoning_parser: str | None = None
    return_tokens_as_token_ids: bool = False


class _Server(uvicorn.Server):
    """uvicorn's server; on SIGTERM it also ends the streams still open after the timeout."""

    def __init__(self, config: uvicorn.Config, llm: AsyncLLM, shutdown_timeout: float):
        super().__init__(config)
        self.llm, self.shutdown_timeout = llm, shutdown_timeout

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            logger.info("shutting down: open requests get %.0f s", self.shutdown_timeout)
            asyncio.get_running_loop().call_later(self.shutdown_timeout, self.llm.fail_all,
                                                  EngineDeadError("the server is shutting down"))
        super().handle_exit(sig, frame)


def serve(llm: AsyncLLM, settings: ServerSettings, sock: socket.socket | None = None) -> int:
    """Serve until SIGTERM or the core's death; the exit status (1: the core died)."""
    app = build_app(llm, settings.served_names, settings.model_path, settings.chat_template, settings.api_key,
                    settings.max_request_body_size, settings.cors, settings.generation_defaults,
                    settings.log_requests, settings.max_log_len, settings.docs, settings.trust_request_chat_template,
                    settings.tool_parser, settings.reasoning_parser, settings.return_tokens_as_token_ids)
    server = _Server(uvicorn_config(app, settings), llm, settings.shutdown_timeout)

    def core_died() -> None:
        logger.error("the engine core died (%s): exiting", llm.error)
        asyncio.get_running_loop().call_later(DEAD_EXIT_DELAY_S, setattr, server, "should_exit", True)

    llm.on_dead = core_died
    freeze_gc_heap()  # the API server's start-up heap too
    server.run(sockets=[sock] if sock is not None else None)
    return 1 if llm.error is not None else 0


def uvicorn_config(app, settings: ServerSettings) -> uvicorn.Config:
    """uvicorn's settings: address, log level, graceful-shutdown time, TLS."""
    ssl = settings.ssl or SSL()
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.uvicorn_log_level,
                          timeout_graceful_shutdown=settings.shutdown_timeout + CUT_AFTER_S,
                          ssl_keyfile=ssl.keyfile, ssl_certfile=ssl.certfile, ssl_ca_certs=ssl.ca_certs,
                          ssl_cert_reqs=ssl.cert_reqs)


def run_api_server(address: str, info: CoreInfo, seed: int, settings: ServerSettings, sock: socket.socket) -> None:
    """An API server process of `--api-server-count N`: a client of the core at `address`."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(serve(AsyncLLM(address, info, seed, tokenizer=settings.tokenizer, max_logprobs=settings.max_logprobs),
                   settings, sock))
