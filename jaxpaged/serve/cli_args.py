"""`jaxpaged serve`'s flags: vLLM's names and help. Engine arguments (engine/arg_utils.py, as
`LLM(...)` takes them) and the server's own (FRONTEND_ARGS); a vLLM flag that changes nothing here
is accepted with a warning, one whose effect would silently differ is a usage error naming it."""
from __future__ import annotations

import argparse
import json
import os

from jaxpaged.engine.arg_utils import EXTRA_ARGS
from jaxpaged.engine.config import KV_CACHE_DTYPES, QUANTIZATION_METHODS
from jaxpaged.engine.sampling_params import MAX_LOGPROBS
from jaxpaged.serve.reasoning import REASONING_PARSERS
from jaxpaged.serve.tool_parsers import TOOL_PARSERS

MAX_REQUEST_BODY_SIZE = 64 << 20  # bytes, --max-request-body-size
# The server's own flags (the rest are engine arguments, engine/arg_utils.py, as `LLM(...)` takes them)
FRONTEND_ARGS = frozenset({
    "model_tag", "device", "served_model_name", "host", "port", "api_key", "chat_template",
    "trust_request_chat_template", "api_server_count",
    "shutdown_timeout", "max_request_body_size", "allowed_origins", "allowed_methods", "allowed_headers",
    "allow_credentials", "log_level", "uvicorn_log_level", "ssl_keyfile", "ssl_certfile", "ssl_ca_certs",
    "ssl_cert_reqs", "enable_log_requests", "disable_log_requests", "max_log_len", "disable_fastapi_docs",
    "response_role", "return_tokens_as_token_ids", "enable_auto_tool_choice", "tool_call_parser"})
# The server's flags whose effect would silently differ: only their default passes (why not)
UNSUPPORTED_FRONTEND = {
    "response_role": "replies carry the role `assistant`"}


def flag(name: str) -> str:
    """An argument's flag: tokenizer_mode -> --tokenizer-mode."""
    return "--" + name.replace("_", "-")


def _effect(name: str) -> str:
    """The help of a vLLM flag from engine/arg_utils.py's table."""
    rule = EXTRA_ARGS[name]
    allowed = getattr(rule, "allowed", None)
    if allowed is None:
        return "accepted, changes nothing: " + rule.why
    return f"only {' / '.join(str(v) for v in allowed if v is not None) or 'unset'}: {rule.why}"


def make_parser(prog: str = "python -m jaxpaged.serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="OpenAI-compatible server for a jaxpaged engine.")
    a = p.add_argument
    a("model_tag", nargs="?", metavar="MODEL", help="as --model")
    a("--model", help="a local HF model directory or a hub id (default: the built-in demo model, built offline)")
    a("--revision", help="hub revision (branch, tag or commit) of a hub id")
    a("--tokenizer", help="the tokenizer's folder or hub id (default: the model's)")
    a("--tokenizer-revision", help="hub revision of a --tokenizer hub id")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="the engine core's JAX platform")
    a("--tokenizer-mode", default="auto", choices=["auto", "hf", "slow", "mistral", "custom"],
      help=_effect("tokenizer_mode"))
    a("--trust-remote-code", action="store_true", help=_effect("trust_remote_code"))
    a("--enforce-eager", action="store_true", help=_effect("enforce_eager"))
    a("--swap-space", type=float, help=_effect("swap_space"))
    a("--max-seq-len-to-capture", type=int, help=_effect("max_seq_len_to_capture"))
    a("--disable-custom-all-reduce", action="store_true", help=_effect("disable_custom_all_reduce"))
    a("--distributed-executor-backend", choices=["ray", "mp", "uni", "external_launcher"],
      help=_effect("distributed_executor_backend"))
    a("--disable-log-stats", action="store_true", help=_effect("disable_log_stats"))
    a("--quantization", "-q", choices=QUANTIZATION_METHODS,
      help="fp8 (W8A8), int8 (W8A16) or int4 (W4A16): quantize a float checkpoint's layer weights at load; "
      "compressed-tensors, modelopt, awq, gptq: the quantized checkpoint's format (default: the checkpoint's own)")
    a("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
      help="auto: the model's dtype; fp8 (= fp8_e4m3), fp8_e5m2: one byte per K/V value (twice the tokens per GB), "
      "with the checkpoint's k_scale / v_scale (default 1.0)")
    a("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, help=_effect("enable_chunked_prefill"))
    a("--pipeline-parallel-size", "-pp", type=int, default=1, help=_effect("pipeline_parallel_size"))
    a("--data-parallel-size", "-dp", type=int, default=1, help=_effect("data_parallel_size"))
    a("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"], help=_effect("scheduling_policy"))
    a("--guided-decoding-backend", help=_effect("guided_decoding_backend"))
    a("--structured-outputs-config", type=json.loads, help=_effect("structured_outputs_config"))
    a("--enable-auto-tool-choice", action="store_true",
      help='tool_choice "auto" (the default with tools): tool calls read from replies by --tool-call-parser')
    a("--tool-call-parser", choices=sorted(TOOL_PARSERS), help="the model family's tool-call format")
    a("--reasoning-parser", choices=sorted(REASONING_PARSERS),
      help="split the model's <think> block into `reasoning_content`; structured output holds after it")
    a("--response-role", default="assistant", help="only assistant: " + UNSUPPORTED_FRONTEND["response_role"])
    a("--return-tokens-as-token-ids", action="store_true",
      help="logprob tokens as 'token_id:N' (a request's return_tokens_as_token_ids overrides it)")
    a("--generation-config", default="auto",
      help="request defaults from generation_config.json: auto (the model's), vllm (none) or a folder")
    a("--override-generation-config", type=json.loads,
      help='JSON of generation-config keys that win over the file, e.g. \'{"temperature": 0.5}\'')
    a("--speculative-config", type=json.loads,
      help='speculative decoding, vLLM\'s JSON keys, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
           '"prompt_lookup_max": 4}\' (docs/spec_decode.md)')
    a("--max-logprobs", type=int, default=MAX_LOGPROBS,
      help=f"most top logprobs a request may ask for (at most {MAX_LOGPROBS} here); more is a 400")
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
    a("--max-model-len", type=int, help="prompt + output tokens (default: the model's limit; at most 4096 on a CPU)")
    a("--gpu-memory-utilization", type=float, default=0.9, help="fraction of device memory to use")
    a("--num-kv-blocks", type=int, help="KV pool size in blocks (overrides the memory budget)")
    a("--max-num-seqs", type=int, help="most requests in one batch (default 256; 16 on a CPU)")
    a("--max-num-batched-tokens", type=int, help="token budget per engine step (default 2048; 256 on a CPU)")
    a("--long-prefill-token-threshold", type=int,
      help="most tokens of one prompt per step (0: up to the budget): shorter steps for running streams")
    a("--decoding-token-budget", type=int,
      help="token budget of a step that carries decodes while the waiting prompts fit in one full budget "
      "(default 384, 0: off): inter-token latency near a decode step's; a backlog gets the whole budget")
    a("--block-size", type=int, default=16, help="tokens per KV block")
    a("--token-buckets", type=int_list, help="comma-separated padded step sizes to compile (default: powers of "
      "two and 192-style steps; on a CPU 16, 64, 256, ...; vLLM's --cuda-graph-sizes)")
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
    a("--ssl-keyfile", help="TLS: the private key file (with --ssl-certfile)")
    a("--ssl-certfile", help="TLS: the certificate file; the server then speaks HTTPS")
    a("--ssl-ca-certs", help="TLS: CA certificates for client certificates")
    a("--ssl-cert-reqs", type=int, default=0, help="TLS: whether a client certificate is required (Python's ssl)")
    a("--enable-log-requests", action="store_true", help="log each generation request's fields at INFO")
    a("--disable-log-requests", action="store_true", help="vLLM's older spelling of the default: no request logs")
    a("--max-log-len", type=int, help="with --enable-log-requests: characters logged per field (default: all)")
    a("--disable-fastapi-docs", action="store_true", help="serve no /openapi.json and /docs")
    a("--seed", type=int, default=0)
    a("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])
    a("--uvicorn-log-level", default="info", choices=["debug", "info", "warning", "error", "critical", "trace"],
      help="uvicorn's log level (its access log is at info)")
    return p


def int_list(value: str) -> tuple[int, ...]:
    """argparse type: "16,32,64" -> (16, 32, 64), a usage error otherwise."""
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def check_frontend_args(args: argparse.Namespace) -> None:
    """ValueError naming the first server flag whose effect would silently differ."""
    for name, why in UNSUPPORTED_FRONTEND.items():
        if getattr(args, name) not in (None, False, "assistant"):  # the defaults
            raise ValueError(f"{flag(name)}={getattr(args, name)!r} is not supported: {why}")
    if args.enable_auto_tool_choice != (args.tool_call_parser is not None):
        raise ValueError("--enable-auto-tool-choice and --tool-call-parser go together: give both or neither")
    if args.enable_log_requests and args.disable_log_requests:
        raise ValueError("--enable-log-requests and --disable-log-requests contradict each other")
    if args.ssl_keyfile and not args.ssl_certfile:
        raise ValueError("--ssl-keyfile needs --ssl-certfile")


