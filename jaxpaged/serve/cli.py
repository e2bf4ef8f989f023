"""`python -m jaxpaged.serve`: vLLM-style flags -> the engine-core process -> API server process(es).

The process that runs this starts the engine core (a spawned process that owns JAX), then
serves HTTP itself, or with `--api-server-count N` spawns N API server processes sharing one
listening socket and supervises them. No API server process imports JAX.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from jaxpaged.engine import demo
from jaxpaged.engine.arg_utils import ENGINE_ARGS, create_engine_config
from jaxpaged.engine.config import EngineConfig
from jaxpaged.engine.generation_config import GenerationDefaults, load_generation_defaults
from jaxpaged.serve.cli_args import check_frontend_args, flag, make_parser

if TYPE_CHECKING:
    from jaxpaged.serve.api_server import ServerSettings

logger = logging.getLogger("jaxpaged.serve")


def engine_config(args: argparse.Namespace, model: str, defaults: dict, resolve: bool = True) -> EngineConfig:
    """The engine arguments among the flags; those given on the command line win over `defaults`
    (the demo's), then EngineConfig's. ValueError / TypeError naming a flag that is not supported."""
    given = {k: v for k, v in vars(args).items() if k in ENGINE_ARGS and k != "model" and v is not None}
    return create_engine_config(model, {**defaults, **given}, flag, resolve)


def configure(args: argparse.Namespace) -> tuple[EngineConfig, GenerationDefaults]:
    """Every check of the flags before anything starts: the engine's config and the requests'
    defaults; ValueError / TypeError naming the flag at fault."""
    check_frontend_args(args)
    if args.num_processes > 1 and not args.coordinator_address:
        raise ValueError("--num-processes > 1 needs --coordinator-address (host:port of process 0)")
    if args.api_server_count < 1:
        raise ValueError("--api-server-count must be at least 1")
    if args.model is None:  # the demo: the engine core builds it
        config = engine_config(args, str(demo.demo_dir()), demo.DEMO_DEFAULTS, resolve=False)
    else:
        config = engine_config(args, args.model, {})
    return config, load_generation_defaults(config.model, config.generation_config, config.override_generation_config)


def server_settings(args: argparse.Namespace, config: EngineConfig, generation_defaults: GenerationDefaults,
                    names: list[str]) -> ServerSettings:
    """What each API server process needs from the flags."""
    from jaxpaged.serve.api_server import SSL, ServerSettings
    from jaxpaged.serve.middleware import CORS

    return ServerSettings(
        names, config.model, args.host, args.port, read_chat_template(args.chat_template), args.api_key,
        args.max_request_body_size, args.shutdown_timeout, args.log_level,
        CORS(args.allowed_origins, args.allowed_methods, args.allowed_headers, args.allow_credentials),
        config.tokenizer, config.max_logprobs, generation_defaults, args.enable_log_requests, args.max_log_len,
        not args.disable_fastapi_docs, args.uvicorn_log_level,
        SSL(args.ssl_keyfile, args.ssl_certfile, args.ssl_ca_certs, args.ssl_cert_reqs),
        trust_request_chat_template=args.trust_request_chat_template, tool_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser, return_tokens_as_token_ids=args.return_tokens_as_token_ids)


def read_chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return path.read_text() if path.is_file() else value


def console_main(argv: list[str] | None = None) -> None:
    """The `jaxpaged` command: `jaxpaged serve [MODEL] [flags]`, as `vllm serve`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "serve":
        print("usage: jaxpaged serve [MODEL] [flags]   (jaxpaged serve --help for the flags)", file=sys.stderr)
        sys.exit(2)
    main(argv[1:], prog="jaxpaged serve")


def main(argv: list[str] | None = None, prog: str = "python -m jaxpaged.serve") -> None:
    parser = make_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.model_tag and args.model and args.model_tag != args.model:
        parser.error(f"MODEL {args.model_tag!r} and --model {args.model!r} differ: give one")
    args.model = args.model_tag or args.model
    logger.info("non-default args: %s", {k: v for k, v in vars(args).items() if v != parser.get_default(k)})
    if args.device != "auto":
        os.environ["JAX_PLATFORMS"] = args.device  # inherited by the engine core's process
    try:
        config, generation_defaults = configure(args)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    if args.model is None:
        names = args.served_model_name or [demo.DEMO_NAME]
        logger.info("no --model: serving the built-in demo model (random weights) from %s", config.model)
    else:
        names = args.served_model_name or [args.model]
    if args.process_id > 0:  # no HTTP here: process 0's core sends the requests
        from jaxpaged.engine.core import EngineCore
        from jaxpaged.engine.multihost import Channel, follow
        follow(EngineCore(config), Channel())
        return
    from jaxpaged.engine.async_llm import AsyncLLM
    from jaxpaged.serve.api_server import run_api_server, serve

    try:
        llm = AsyncLLM.from_engine_config(config, args.log_level, demo=args.model is None)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    info = llm.info
    settings = server_settings(args, config, generation_defaults, names)
    logger.info("serving %s on %s://%s:%d (%d API server process%s)", ", ".join(names), "https" if args.ssl_certfile else "http",
                args.host, args.port, args.api_server_count, "es" if args.api_server_count > 1 else "")
    if args.api_server_count == 1:
        sys.exit(serve(llm, settings))
    sock = socket.create_server((args.host, args.port), reuse_port=False)
    ctx = multiprocessing.get_context("spawn")
    servers = [ctx.Process(target=run_api_server, name=f"jaxpaged-api-{i}",
                           args=(llm.address, info, config.seed + 1 + i, settings, sock))
               for i in range(args.api_server_count)]
    for p in servers:
        p.start()
    sys.exit(_supervise(servers, llm))


def _supervise(servers: list, llm) -> int:
    """Forward SIGTERM / SIGINT to the API servers, wait for them, stop the core; the exit
    status is the first non-zero one of theirs (one failing ends the others)."""
    def forward(sig, frame) -> None:
        for p in servers:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    remaining = list(servers)
    while remaining:
        multiprocessing.connection.wait([p.sentinel for p in remaining])
        for p in [p for p in remaining if not p.is_alive()]:
            remaining.remove(p)
            if p.exitcode and not status:
                status = p.exitcode if p.exitcode > 0 else 1
                forward(None, None)
    llm.shutdown()
    return status
