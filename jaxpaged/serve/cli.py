"""`python -m jaxpaged.serve`: vLLM-style flags -> engine -> app -> uvicorn."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from jaxpaged.engine.config import EngineConfig

logger = logging.getLogger("jaxpaged.serve")
# On SIGTERM, how long open requests may finish before they are cancelled (a client holding a
# stream open without reading it would otherwise keep the process alive indefinitely).
GRACEFUL_SHUTDOWN_S = 10


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxpaged.serve",
                                description="OpenAI-compatible server for a jaxpaged engine.")
    a = p.add_argument
    a("--model", help="HF model directory (default: the built-in demo model, built offline)")
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
    given = {k: getattr(args, k) for k in ("max_model_len", "max_num_seqs", "max_num_batched_tokens")
             if getattr(args, k) is not None}
    return EngineConfig(
        model=model, dtype={"half": "float16", "float": "float32"}.get(args.dtype, args.dtype),
        gpu_memory_utilization=args.gpu_memory_utilization, num_kv_blocks=args.num_kv_blocks,
        block_size=args.block_size, enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size, load_format=args.load_format,
        async_scheduling=args.async_scheduling, max_steps_in_flight=args.max_steps_in_flight,
        num_scheduler_steps=args.num_scheduler_steps, token_buckets=args.token_buckets,
        coordinator_address=args.coordinator_address, num_processes=args.num_processes, process_id=args.process_id,
        **{**defaults, **given})


def read_chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return path.read_text() if path.is_file() else value


def main(argv: list[str] | None = None) -> None:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import jax
    import uvicorn

    from jaxpaged.engine.llm_engine import LLMEngine
    from jaxpaged.serve import demo
    from jaxpaged.serve.app import build_app
    from jaxpaged.serve.async_engine import AsyncEngine
    from jaxpaged.serve.multiprocess import Channel, Leader, follow

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # fast restarts: reuse compiled steps
        jax.config.update("jax_compilation_cache_dir", str(demo.cache_root() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if args.model is None:
        model, defaults = str(demo.demo_model_dir()), demo.DEMO_DEFAULTS
        names = args.served_model_name or [demo.DEMO_NAME]
        logger.info("no --model: serving the built-in demo model (random weights) from %s", model)
    else:
        model, defaults = args.model, {}
        names = args.served_model_name or [args.model]
    if args.num_processes > 1 and not args.coordinator_address:
        parser.error("--num-processes > 1 needs --coordinator-address (host:port of process 0)")
    try:
        engine = LLMEngine(engine_config(args, model, defaults))
    except (ValueError, OSError) as e:
        parser.error(str(e))
    if args.process_id > 0:
        follow(engine, Channel())  # no HTTP here: process 0 sends the requests
        return
    s, cfg = engine.startup, engine.model_config
    logger.info("loaded %s (%s, %d layers, vocab %d) in %.1f s", model, cfg.architecture, cfg.num_layers,
                cfg.vocab_size, s["load_s"])
    logger.info("KV cache: %d blocks x %d = %d tokens; max_model_len %d", s["num_kv_blocks"],
                engine.config.block_size, s["kv_capacity_tokens"], engine.max_model_len)
    logger.info("compiled token buckets %s in %.1f s", s["buckets"], s["warmup_s"])
    leader = Leader(engine, Channel()) if args.num_processes > 1 else None
    async_engine = AsyncEngine(leader or engine)
    app = build_app(async_engine, names, model, read_chat_template(args.chat_template), args.api_key)
    logger.info("serving %s on http://%s:%d", ", ".join(names), args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    if leader is not None and async_engine.error is None:  # the engine thread has stopped
        leader.stop()
