"""vLLM's flags and engine arguments: each honoured, a usage error naming it, or accepted with a
one-line warning that it changes nothing here; `LLM(...)` takes the CLI's engine arguments by the
same names; generation_config.json defaults by vLLM's rules. No engine is started here."""
from __future__ import annotations

import json
import logging
import shutil
import ssl
import subprocess
import threading
import time

import httpx
import pytest

from jaxpaged import LLM, SamplingParams
from jaxpaged.engine.arg_utils import ENGINE_ARGS
from jaxpaged.engine.generation_config import load_generation_defaults
from jaxpaged.serve.cli import configure, main, server_settings
from jaxpaged.serve.cli_args import FRONTEND_ARGS, make_parser
from jaxpaged.serve.protocol import ChatCompletionRequest

WARN, ERROR = "warn", "error"
FLAGS = [  # (flags, WARN: the warning / ERROR: the usage error / a callable: the effect on (config, args))
    (["--trust-remote-code"], WARN, "--trust-remote-code changes nothing here"),
    (["--enforce-eager"], WARN, "--enforce-eager changes nothing here"),
    (["--swap-space", "4"], WARN, "--swap-space changes nothing here"),
    (["--max-seq-len-to-capture", "8192"], WARN, "--max-seq-len-to-capture changes nothing here"),
    (["--disable-custom-all-reduce"], WARN, "--disable-custom-all-reduce changes nothing here"),
    (["--distributed-executor-backend", "mp"], WARN, "--distributed-executor-backend changes nothing here"),
    (["--disable-log-stats"], WARN, "--disable-log-stats changes nothing here"),
    (["--quantization", "bitsandbytes"], ERROR, "argument --quantization/-q: invalid choice: 'bitsandbytes'"),
    (["-q", "fp8"], lambda c, a: c.quantization == "fp8", None),
    (["--kv-cache-dtype", "fp8"], lambda c, a: c.kv_cache_dtype == "fp8", None),
    (["--kv-cache-dtype", "fp8_inc"], ERROR, "argument --kv-cache-dtype: invalid choice: 'fp8_inc'"),
    (["--no-enable-chunked-prefill"], ERROR, "--enable-chunked-prefill=False is not supported"),
    (["--scheduling-policy", "priority"], ERROR, "--scheduling-policy='priority' is not supported"),
    (["-pp", "2"], ERROR, "--pipeline-parallel-size=2 is not supported"),
    (["--data-parallel-size", "2"], ERROR, "--data-parallel-size=2 is not supported"),
    (["--guided-decoding-backend", "outlines"], ERROR, "--guided-decoding-backend='outlines' is not supported"),
    (["--structured-outputs-config", '{"backend": "guidance"}'], ERROR, "--structured-outputs-config="),
    (["--tokenizer-mode", "mistral"], ERROR, "--tokenizer-mode='mistral' is not supported"),
    (["--enable-auto-tool-choice"], ERROR, "--enable-auto-tool-choice and --tool-call-parser go together"),
    (["--tool-call-parser", "hermes"], ERROR, "--enable-auto-tool-choice and --tool-call-parser go together"),
    (["--enable-auto-tool-choice", "--tool-call-parser", "xml"], ERROR, "invalid choice: 'xml'"),
    (["--reasoning-parser", "o1"], ERROR, "invalid choice: 'o1'"),
    (["--response-role", "bot"], ERROR, "--response-role='bot' is not supported"),
    (["--return-tokens-as-token-ids"], lambda c, a: _settings(c, a).return_tokens_as_token_ids, None),
    (["--enable-log-requests", "--disable-log-requests"], ERROR, "contradict each other"),
    (["--ssl-keyfile", "key.pem"], ERROR, "--ssl-keyfile needs --ssl-certfile"),
    (["--max-logprobs", "50"], ERROR, "max_logprobs must be in [0, 20]"),
    (["--generation-config", "/nonexistent"], ERROR, "generation_config '/nonexistent' is neither"),
    (["--enable-chunked-prefill", "--kv-cache-dtype", "auto", "--scheduling-policy", "fcfs", "-pp", "1"],
     lambda c, a: c.model is not None, None),
    (["--max-logprobs", "5"], lambda c, a: c.max_logprobs == 5, None),
    (["--guided-decoding-backend", "xgrammar", "--structured-outputs-config", '{"backend": "auto"}'],
     lambda c, a: c.model is not None, None),
    (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}'],
     lambda c, a: (c.speculative_config.num_speculative_tokens, c.speculative_config.prompt_lookup_min) == (3, 4), None),
    (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, "lookahead": 2}'], ERROR,
     "speculative_config key(s) not supported: lookahead"),
    (["--speculative-config", '{"method": "draft_model", "model": "m", "num_speculative_tokens": 3}'], ERROR,
     "model 'm' is not a local directory and not in the Hugging Face cache"),  # the draft model is resolved
    (["--generation-config", "vllm"], lambda c, a: c.generation_config == "vllm", None),
    (["--dtype", "half"], lambda c, a: c.dtype == "float16", None),
    (["--uvicorn-log-level", "debug", "--enable-log-requests", "--max-log-len", "9", "--disable-fastapi-docs"],
     lambda c, a: _settings(c, a).uvicorn_log_level == "debug" and _settings(c, a).log_requests
     and _settings(c, a).max_log_len == 9 and not _settings(c, a).docs, None),
    (["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"],
     lambda c, a: (_settings(c, a).tool_parser, _settings(c, a).reasoning_parser) == ("hermes", "qwen3"), None),
    (["--ssl-keyfile", "k.pem", "--ssl-certfile", "c.pem"],
     lambda c, a: (_settings(c, a).ssl.keyfile, _settings(c, a).ssl.certfile) == ("k.pem", "c.pem"), None),
]


def _settings(config, args):
    return server_settings(args, config, load_generation_defaults(config.model), ["m"])


@pytest.mark.parametrize("flags,expect,text", FLAGS, ids=[" ".join(f[0]) for f in FLAGS])
def test_vllm_flag(flags, expect, text, tiny_model_dir, caplog, capsys):
    model = str(tiny_model_dir("llama"))
    if expect == ERROR:  # the real entry point: a usage error (exit 2) before anything starts
        with pytest.raises(SystemExit) as exit_:
            main([model, *flags])
        assert exit_.value.code == 2 and text in capsys.readouterr().err
        return
    args = make_parser().parse_args([model, *flags])
    args.model = args.model_tag
    with caplog.at_level(logging.WARNING):
        config, _ = configure(args)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if expect == WARN:
        assert len(warnings) == 1 and warnings[0].startswith(text), warnings
    else:
        assert not warnings and expect(config, args)


def test_tokenizer_flag_reaches_the_api_sides_tokenizer(tiny_model_dir, tmp_path):
    """--tokenizer DIR: the engine config names it, and the API side (AsyncLLM) loads its
    tokenizer from there, not from the model folder (which here has none)."""
    from jaxpaged.engine.async_llm import AsyncLLM
    from jaxpaged.engine.messages import CoreInfo

    src = tiny_model_dir("llama")
    model = tmp_path / "model"
    shutil.copytree(src, model, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    args = make_parser().parse_args(["--model", str(model), "--tokenizer", str(src)])
    config, _ = configure(args)
    assert config.tokenizer == str(src)
    from transformers import AutoTokenizer

    info = CoreInfo(str(model), 128, 512, 4, 64, [])
    without, with_flag = AsyncLLM("ipc:///nonexistent", info), AsyncLLM("ipc:///nonexistent", info, tokenizer=config.tokenizer)
    try:
        assert without.tokenizer is None
        assert with_flag.tokenizer.encode("Hello world") == AutoTokenizer.from_pretrained(src).encode("Hello world")
    finally:
        without.shutdown(stop_core=False)
        with_flag.shutdown(stop_core=False)


def test_every_cli_flag_is_classified_and_llm_takes_the_engine_ones(tiny_model_dir, monkeypatch, caplog):
    """Each CLI dest is an engine argument or one of the server's own; `LLM(...)` accepts every
    engine one under the CLI's name (at the CLI's default) and refuses an unknown name."""
    import jaxpaged.llm

    built = []
    monkeypatch.setattr(jaxpaged.llm, "LLMEngine", lambda config: built.append(config))
    parser = make_parser()
    dests = {a.dest for a in parser._actions} - {"help"}
    assert dests <= ENGINE_ARGS | FRONTEND_ARGS, dests - ENGINE_ARGS - FRONTEND_ARGS
    engine_dests = (dests & ENGINE_ARGS) - {"model"}
    LLM(str(tiny_model_dir("llama")), **{d: parser.get_default(d) for d in engine_dests})
    assert len(built) == 1
    with pytest.raises(TypeError, match="unexpected engine argument.*bogus_arg"):
        LLM(str(tiny_model_dir("llama")), bogus_arg=1)
    with pytest.raises(ValueError, match="kv_cache_dtype 'int8' is not supported"):
        LLM(str(tiny_model_dir("llama")), kv_cache_dtype="int8")
    for name in ("fp8_e5m2", "bfloat16"):
        LLM(str(tiny_model_dir("llama")), kv_cache_dtype=name)
        assert built[-1].kv_cache_dtype == name
    with pytest.raises(ValueError, match="quantization must be one of fp8, int8, int4, .* got 'bitsandbytes'"):
        LLM(str(tiny_model_dir("llama")), quantization="bitsandbytes")
    LLM(str(tiny_model_dir("llama")), quantization="int8")
    assert built[-1].quantization == "int8"
    with caplog.at_level(logging.WARNING):
        LLM(str(tiny_model_dir("llama")), enforce_eager=True, max_logprobs=3, tokenizer=str(tiny_model_dir("llama")))
    assert "enforce_eager changes nothing here" in caplog.text
    assert (built[-1].max_logprobs, built[-1].tokenizer) == (3, str(tiny_model_dir("llama")))


# ---- generation_config.json --------------------------------------------------------------------
GEN = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "max_new_tokens": 7,
       "do_sample": True, "bos_token_id": 1}


@pytest.fixture
def gen_model(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    (model / "generation_config.json").write_text(json.dumps(GEN))
    return model


def test_generation_config_modes(gen_model, tmp_path):
    """auto: the model folder's file; vllm: none; a folder: that folder's, whose max_new_tokens
    also caps every request; the override wins over the file; a bad value names the file."""
    auto = load_generation_defaults(str(gen_model))
    assert (auto.temperature, auto.top_p, auto.top_k, auto.min_p, auto.repetition_penalty) == (0.6, 0.9, 20, None, 1.1)
    assert (auto.max_tokens, auto.max_tokens_cap) == (7, None)
    assert load_generation_defaults(str(gen_model), "vllm").sampling_params() == SamplingParams()
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 3}))
    folder = load_generation_defaults(str(gen_model), str(other))
    assert (folder.temperature, folder.top_p, folder.max_tokens, folder.max_tokens_cap) == (0.0, None, 3, 3)
    over = load_generation_defaults(str(gen_model), "auto", {"temperature": 0.2, "max_new_tokens": 4})
    assert (over.temperature, over.top_p, over.max_tokens, over.max_tokens_cap) == (0.2, 0.9, 4, 4)
    (other / "generation_config.json").write_text(json.dumps({"top_p": 0}))
    with pytest.raises(ValueError, match="generation_config.json: top_p must be in"):
        load_generation_defaults(str(gen_model), str(other))


def test_request_defaults_from_the_generation_config(gen_model):
    """Unset sampling fields take the file's values, set ones win; the cap bounds max_tokens."""
    defaults = load_generation_defaults(str(gen_model))
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], top_p=0.5)
    req.apply_defaults(defaults)
    p = req.sampling_params(req.max_tokens, None)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.min_p) == (0.6, 0.5, 20, 1.1, 0.0)
    assert req.max_tokens is None  # the Processor applies max_tokens (it knows the prompt's room)
    capped = load_generation_defaults(str(gen_model), "auto", {"max_new_tokens": 4})
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_completion_tokens=9, temperature=1)
    req.apply_defaults(capped)
    assert (req.max_completion_tokens, req.temperature) == (4, 1)


def test_llm_default_sampling_params(gen_model, monkeypatch):
    """`LLM.get_default_sampling_params()` and generate() without SamplingParams use the file
    (vLLM's rules); generation_config="vllm" ignores it."""
    import jaxpaged.llm

    sent = []

    class Engine:
        def __init__(self, config):
            pass

        def add_request(self, request_id, prompt, params, cache_salt=None):
            sent.append(params)
            raise KeyboardInterrupt  # stop generate() here

        def abort_request(self, request_id):
            pass

    monkeypatch.setattr(jaxpaged.llm, "LLMEngine", Engine)
    llm = LLM(str(gen_model))
    expected = SamplingParams(temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.1, max_tokens=7)
    assert llm.get_default_sampling_params() == expected
    with pytest.raises(KeyboardInterrupt):
        llm.generate("hi", use_tqdm=False)
    assert (sent[-1].temperature, sent[-1].max_tokens) == (0.6, 7)
    assert LLM(str(gen_model), generation_config="vllm").get_default_sampling_params() == SamplingParams()


# ---- TLS --------------------------------------------------------------------------------------
def test_ssl_flags_serve_https(tmp_path):
    """--ssl-keyfile / --ssl-certfile reach uvicorn: a self-signed certificate, a TLS handshake
    that verifies it, and the answer over HTTPS."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    import uvicorn

    from jaxpaged.serve.api_server import uvicorn_config

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    args = make_parser().parse_args(["--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--host", "127.0.0.1",
                                     "--port", "0", "--uvicorn-log-level", "warning"])
    config, defaults = configure(args)
    settings = server_settings(args, config, defaults, ["m"])
    app = Starlette(routes=[Route("/", lambda r: PlainTextResponse("over tls"))])
    server = uvicorn.Server(uvicorn_config(app, settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        r = httpx.get(f"https://127.0.0.1:{port}/", verify=ssl.create_default_context(cafile=str(cert)))
        assert r.text == "over tls"
        with pytest.raises(httpx.ConnectError):  # the self-signed certificate is in no default trust store
            httpx.get(f"https://127.0.0.1:{port}/", verify=True)
    finally:
        server.should_exit = True
        thread.join(10)
