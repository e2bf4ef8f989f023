"""The server's surface beyond generation: the model's generation_config.json as request
defaults, --max-logprobs, request logs, /openapi.json and /docs, and schemathesis fuzzing the
spec against the live server (0 responses >= 500). One server (tests/test_server.py's, same
engine shapes) over a copy of the tiny model with a generation_config.json."""
from __future__ import annotations

import json
import logging
import shutil

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from test_server import MESSAGES, MODEL, start_server

from jaxpaged.engine.generation_config import load_generation_defaults

GEN = {"temperature": 0.0, "max_new_tokens": 5}
MAX_LOGPROBS = 5
MAX_LOG_LEN = 12


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    model = tmp_path_factory.mktemp("gen") / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    (model / "generation_config.json").write_text(json.dumps(GEN))
    s = start_server(model, llm_kwargs={"max_logprobs": MAX_LOGPROBS}, max_request_body_size=1 << 20,
                     generation_defaults=load_generation_defaults(str(model)), log_requests=True,
                     max_log_len=MAX_LOG_LEN)
    yield s
    s.stop()


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def test_generation_config_sets_the_defaults_a_request_leaves_unset(server):
    """The file says temperature 0: samples without a temperature are the greedy ones; a request
    that sets one wins. Its max_new_tokens is the chat default for max_tokens."""
    texts = lambda r: [c["text"] for c in r.json()["choices"]]  # noqa: E731
    body = {"model": MODEL, "prompt": "Hello world", "max_tokens": 8, "n": 3, "ignore_eos": True}
    unset = texts(post(server, "/v1/completions", body))
    greedy = texts(post(server, "/v1/completions", {**body, "temperature": 0, "n": 1}))
    assert unset == greedy * 3
    sampled = texts(post(server, "/v1/completions", {**body, "temperature": 1.0, "n": 4, "seed": 1}))
    assert len(set(sampled)) > 1
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == GEN["max_new_tokens"], r.text
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "ignore_eos": True,
                                               "max_tokens": 7})
    assert r.json()["usage"]["completion_tokens"] == 7


def test_max_logprobs_is_enforced(server):
    ok = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "logprobs": MAX_LOGPROBS})
    assert ok.status_code == 200 and ok.json()["choices"][0]["logprobs"]["top_logprobs"][0], ok.text
    for path, body in (("/v1/completions", {"prompt": "Hi", "logprobs": MAX_LOGPROBS + 1}),
                       ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True,
                                                 "top_logprobs": MAX_LOGPROBS + 1})):
        r = post(server, path, {**body, "max_tokens": 2})
        assert r.status_code == 400 and "logprobs of 6, which is greater than max allowed: 5" in r.text, r.text


def test_request_logs(server, caplog):
    """--enable-log-requests: one INFO line per generation request, fields cut to --max-log-len."""
    with caplog.at_level(logging.INFO, logger="jaxpaged.serve"):
        post(server, "/v1/completions", {"prompt": "A long prompt that is cut in the log", "max_tokens": 2})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request /v1/completions")]
    assert len(lines) == 1 and "'prompt': 'A long promp...'" in lines[0] and "'max_tokens': 2" in lines[0], lines


def test_openapi_spec_covers_the_routes_and_docs_load_it(server):
    """/openapi.json is OpenAPI 3.1 with a path for each of the app's routes (and method), the
    request bodies are the pydantic models' schemas; /docs is Swagger UI over it."""
    spec = httpx.get(server.url + "/openapi.json").json()
    assert spec["openapi"] == "3.1.0"
    schemathesis.openapi.from_dict(spec)  # a spec schemathesis can load
    app = server.uvicorn.config.app
    for route in app.routes:
        if route.path in ("/openapi.json", "/docs"):
            continue
        for method in route.methods - {"HEAD"}:
            assert method.lower() in spec["paths"][route.path], (route.path, method)
    body = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    completion = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert completion["properties"]["n"]["maximum"] == 128 and "prompt" in completion["required"]
    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200 and "SwaggerUIBundle" in docs.text and "./openapi.json" in docs.text


def _bounded(body):
    """A fuzzed body with its work bounded (few samples, prompts and tokens) so that the run
    stays short; every other field as generated."""
    if isinstance(body, dict):
        for name, most in (("n", 2), ("best_of", 2), ("max_tokens", 4), ("max_completion_tokens", 4)):
            if isinstance(body.get(name), int) and not isinstance(body[name], bool) and body[name] > most:
                body[name] = most
        if isinstance(body.get("prompt"), list):
            body["prompt"] = body["prompt"][:4]
    return body


@pytest.fixture(scope="module")
def operations(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    return [op.ok() for op in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schemathesis_finds_no_server_error(server, operations, mode):
    """Cases generated from /openapi.json (valid ones, then invalid ones), every operation:
    no response >= 500, and every error in OpenAI's body."""
    strategy = st.one_of([op.as_strategy(generation_mode=mode) for op in operations])

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=strategy)
    def run(case):
        case.body = _bounded(case.body)
        r = case.call(base_url=server.url, timeout=60)
        assert r.status_code < 500, (case.method, case.path, case.body, r.text)
        event(f"{case.method} {case.path} -> {r.status_code}")
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text

    run()
    assert server.llm.alive
