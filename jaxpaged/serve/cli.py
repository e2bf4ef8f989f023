"""`python -m jaxpaged.serve`: vLLM-style flags -> the engine-core process -> API server process(es).

The process that runs this starts the engine core (a spawned process that owns JAX), then
serves HTTP itself, or with `--api-server-count N` spawns N API server processes sharing one
listening socket and supervises them. No API server process imports JAX.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
from pathlib import Path

from jaxpaged.engine import demo
from jaxpaged.engine.config import EngineConfig
from jaxpaged.engine.hub import resolve_model

logger = logging.getLogger("jaxpaged.serve")
MAX_REQUEST_BODY_SIZE = 64 << 20  # bytes, --max-request-body-size
# vLLM flags that change nothing here: accepted (launch lines carry them) with a one-line warning
NO_EFFECT = {"trust_remote_code": "jaxpaged runs no code from the model repository",
             "enforce_eager": "the steps are always compiled ahead; there are no CUDA graphs to skip",
             "swap_space": "a preempted request is recomputed; nothing is swapped to host memory"}


def make_parser(prog: str = "python -m jaxpaged.serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="OpenAI-compatible server for a jaxpaged engine.")
    a = p.add_argument
    a("model_tag", nargs="?", metavar="MODEL", help="as --model")
    a("--model", help="a local HF model directory or a hub id (default: the built-in demo model, built offline)")
    a("--revision", help="hub revision (branch, tag or commit) of a hub id")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="the engine core's JAX platform")
    a("--tokenizer-mode", default="auto", choices=["auto", "hf", "slow", "mistral", "custom"],
      help="auto / hf: the HF (fast) tokenizer, the only one here")
    a("--trust-remote-code", action="store_true", help="accepted, changes nothing: " + NO_EFFECT["trust_remote_code"])
    a("--enforce-eager", action="store_true", help="accepted, changes nothing: " + NO_EFFECT["enforce_eager"])
    a("--swap-space", type=float, help="accepted, changes nothing: " + NO_EFFECT["swap_space"])
    a("--download-dir", help="Hugging Face cache directory to look in and download to")
    a("--served-model-name", nargs="+", help="name(s) the API answers to; the first is echoed")
    a("--host", default="0.0.0.0")
    a("--port", type=int, default=8000)
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32", "half", "float"])
    a("--load-format", default="auto", choices=["auto", "dummy"], help="dummy: random weights (benchmarks)")
    a("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
      help="launch the next steps before processing a step's outputs")
    a("--max-steps-in-flight", type=int, default=2,
      help="async scheduling: launched steps whose outputs may wait unprocessed (1: one step ahead)")
    a("--num-scheduler-steps", type=int, default=1,
      help="multi-step decode: forward + sample iterations per all-decode step (one dispatch)")
    a("--max-model-len", type=int, help="prompt + output tokens (default: the model's limit)")
    a("--gpu-memory-utilization", type=float, default=0.9, help="fraction of device memory to use")
    a("--num-kv-blocks", type=int, help="KV pool size in blocks (overrides the memory budget)")
    a("--max-num-seqs", type=int, help="most requests in one batch (default 256)")
    a("--max-num-batched-tokens", type=int, help="token budget per engine step (default 2048)")
    a("--long-prefill-token-threshold", type=int, default=0,
      help="most tokens of one prompt per step (0: up to the budget): shorter steps for running streams")
    a("--block-size", type=int, default=16, help="tokens per KV block")
    a("--token-buckets", type=int_list, help="comma-separated padded step sizes to compile (default: powers of "
      "two and 192-style steps; vLLM's --cuda-graph-sizes)")
    a("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    a("--tensor-parallel-size", "-tp", type=int, default=1)
    a("--num-processes", type=int, default=1,
      help="JAX processes of the mesh (e.g. one per host); process 0 serves HTTP, the others follow it")
    a("--process-id", type=int, default=0)
    a("--coordinator-address", help="host:port of process 0's JAX coordinator (with --num-processes > 1)")
    a("--api-key", default=os.environ.get("JAXPAGED_API_KEY"),
      help="require `Authorization: Bearer KEY` on /v1 routes (or env JAXPAGED_API_KEY)")
    a("--chat-template", help="Jinja chat template: a file or the template itself")
    a("--trust-request-chat-template", action="store_true",
      help="use a request's own `chat_template` (refused otherwise, as in vLLM)")
    a("--api-server-count", type=int, default=1, help="API server processes on the port, one engine core")
    a("--shutdown-timeout", type=float, default=30.0,
      help="on SIGTERM, seconds open requests may finish; then their streams end with an error event")
    a("--max-request-body-size", type=int, default=MAX_REQUEST_BODY_SIZE,
      help="bytes; a larger request body gets 413 before it is parsed")
    a("--allowed-origins", type=json.loads, default=["*"], help='CORS origins, a JSON list (default ["*"])')
    a("--allowed-methods", type=json.loads, default=["*"], help="CORS methods, a JSON list")
    a("--allowed-headers", type=json.loads, default=["*"], help="CORS headers, a JSON list")
    a("--allow-credentials", action="store_true", help="CORS: allow credentials")
    a("--seed", type=int, default=0)
    a("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])
    return p


def int_list(value: str) -> tuple[int, ...]:
    """argparse type: "16,32,64" -> (16, 32, 64), a usage error otherwise."""
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def engine_config(args: argparse.Namespace, model: str, defaults: dict) -> EngineConfig:
    """Flags given on the command line win over `defaults` (the demo's), then EngineConfig's."""
    given = {k: getattr(args, k) for k in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "token_buckets")
             if getattr(args, k) is not None}
    return EngineConfig(
        model=model, dtype={"half": "float16", "float": "float32"}.get(args.dtype, args.dtype),
        gpu_memory_utilization=args.gpu_memory_utilization, num_kv_blocks=args.num_kv_blocks,
        block_size=args.block_size, enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size, load_format=args.load_format,
        async_scheduling=args.async_scheduling, max_steps_in_flight=args.max_steps_in_flight,
        num_scheduler_steps=args.num_scheduler_steps, long_prefill_token_threshold=args.long_prefill_token_threshold,
        coordinator_address=args.coordinator_address, num_processes=args.num_processes, process_id=args.process_id,
        **{**defaults, **given})


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
    for name, why in NO_EFFECT.items():
        if getattr(args, name) not in (None, False):
            logger.warning("--%s changes nothing here: %s", name.replace("_", "-"), why)
    if args.tokenizer_mode not in ("auto", "hf"):
        parser.error(f"--tokenizer-mode {args.tokenizer_mode} is not supported: jaxpaged uses the HF tokenizer (auto)")
    if args.device != "auto":
        os.environ["JAX_PLATFORMS"] = args.device  # inherited by the engine core's process
    if args.model is None:
        model, defaults = str(demo.demo_dir()), demo.DEMO_DEFAULTS
        names = args.served_model_name or [demo.DEMO_NAME]
        logger.info("no --model: serving the built-in demo model (random weights) from %s", model)
    else:
        try:
            model, defaults = resolve_model(args.model, args.revision, args.download_dir), {}
        except ValueError as e:
            parser.error(str(e))
        names = args.served_model_name or [args.model]
    if args.num_processes > 1 and not args.coordinator_address:
        parser.error("--num-processes > 1 needs --coordinator-address (host:port of process 0)")
    if args.api_server_count < 1:
        parser.error("--api-server-count must be at least 1")
    try:
        config = engine_config(args, model, defaults)
    except ValueError as e:
        parser.error(str(e))
    if args.process_id > 0:  # no HTTP here: process 0's core sends the requests
        from jaxpaged.engine.core import EngineCore
        from jaxpaged.engine.multihost import Channel, follow
        follow(EngineCore(config), Channel())
        return
    from jaxpaged.engine.async_llm import AsyncLLM
    from jaxpaged.serve.api_server import ServerSettings, run_api_server, serve
    from jaxpaged.serve.middleware import CORS

    try:
        llm = AsyncLLM.from_engine_config(config, args.log_level, demo=args.model is None)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    info = llm.info
    cors = CORS(args.allowed_origins, args.allowed_methods, args.allowed_headers, args.allow_credentials)
    settings = ServerSettings(names, model, args.host, args.port, read_chat_template(args.chat_template),
                              args.api_key, args.max_request_body_size, args.shutdown_timeout, args.log_level, cors,
                              args.trust_request_chat_template)
    logger.info("serving %s on http://%s:%d (%d API server process%s)", ", ".join(names), args.host, args.port,
                args.api_server_count, "es" if args.api_server_count > 1 else "")
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
