"""The OpenAI server over real HTTP on 127.0.0.1, checked with the official `openai` client.

One server (uvicorn in a thread) for the module, split as in production: the app over an
`AsyncLLM` that talks to the engine core over ZeroMQ and msgpack; the core runs in a thread
of this process (so tests can slow or break its steps). Its engine uses the shapes of
tests/test_engine.py, so the compiled steps are shared. The offline `LLM` on the same model
is the oracle for generated text. tests/test_server_cli.py runs the real processes.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from hf_oracle import hf_logits_of, log_softmax
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from jaxpaged import LLM, SamplingParams
from jaxpaged.engine.async_llm import AsyncLLM
from jaxpaged.engine.config import EngineConfig
from jaxpaged.engine.core import EngineCore
from jaxpaged.engine.core_proc import start_core_thread, stop_core_thread
from jaxpaged.serve.app import build_app

ENGINE = dict(max_model_len=128, block_size=4, num_kv_blocks=1024, max_num_seqs=64, max_num_batched_tokens=64)
KEY = "test-key"
BODY_LIMIT = 16 << 20
MODEL = "tiny"
PROMPTS = ["Hello world", "The quick brown fox", "Readability counts.", "jaxpaged serves"]


@dataclasses.dataclass
class Server:
    url: str
    core: EngineCore
    llm: AsyncLLM
    uvicorn: uvicorn.Server
    thread: threading.Thread
    core_address: str
    core_thread: threading.Thread

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)
        stop_core_thread(self.core_address, self.core_thread)


def start_server(model_dir, llm_kwargs: dict | None = None, **app_kwargs) -> Server:
    core = EngineCore(EngineConfig(model=str(model_dir), **ENGINE))
    address, core_thread = start_core_thread(core)
    llm = AsyncLLM(address, core.info, **(llm_kwargs or {}))
    url, server, thread = serve(build_app(llm, [MODEL, "tiny-alias"], str(model_dir), **app_kwargs))
    return Server(url, core, llm, server, thread, address, core_thread)


def serve(app) -> tuple[str, uvicorn.Server, threading.Thread]:
    """`app` served by uvicorn on a free local port, in a thread: (its URL, the server, the thread)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def server(model_dir):
    s = start_server(model_dir, api_key=KEY, max_request_body_size=BODY_LIMIT, trust_request_chat_template=True)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def oracle(model_dir):
    """The offline API on the same model and shapes: the reference for generated text."""
    return LLM(model_dir, **ENGINE)


@pytest.fixture(scope="module")
def hf_log_softmax(model_dir):
    """HF transformers (float32): `f(ids)[i]` is the log-softmax after `ids[:i + 1]` ([len - 1, V])."""
    logits = hf_logits_of(model_dir)
    return lambda ids: log_softmax(logits(ids)[:-1])


def metrics(server: Server) -> dict[str, float]:
    """`/metrics` as {name{labels}: value}, keyed by name only for single-series metrics."""
    out = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("vllm:"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
            out.setdefault(key.split("{")[0], float(value))
    return out


def wait_idle(server: Server, timeout: float = 10) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0 \
                and m["vllm:kv_cache_usage_perc"] == 0:
            return m
        assert time.monotonic() < deadline, f"engine not idle: {m}"
        time.sleep(0.05)


# ---- endpoints ----------------------------------------------------------------------------
def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL, "tiny-alias"]
    assert client.models.list().data[0].model_extra["max_model_len"] == 128
    assert client.models.list().data[0].model_extra["quantization"] is None  # float weights
    assert client.models.list().data[0].model_extra["kv_cache_dtype"] == "float32"
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]


def test_tokenize_detokenize_roundtrip(server, oracle):
    tok = oracle.get_tokenizer()
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world!", "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("Hello world!") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 128 and len(r["token_strs"]) == r["count"]
    assert httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello world!"}
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    expected = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tok.encode(expected, add_special_tokens=False)


# ---- completions --------------------------------------------------------------------------
def test_completion_greedy_matches_offline_api(client, oracle):
    r = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    want = oracle.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [w.outputs[0].text for w in want]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 4 * 12
    assert r.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want)


def test_completion_token_id_prompts_equal_text_prompts(client, oracle):
    ids = [oracle.get_tokenizer().encode(p) for p in PROMPTS[:2]]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=6, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    single = client.completions.create(model=MODEL, prompt=ids[0], max_tokens=6, temperature=0)
    assert single.choices[0].text == by_text.choices[0].text


def _streamed_texts(stream) -> tuple[dict[int, str], dict[int, str], list]:
    texts, finish, usage = {}, {}, []
    for chunk in stream:
        if chunk.usage is not None:
            usage.append(chunk.usage)
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, usage


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=7)])
def test_completion_stream_equals_non_stream(client, sampling):
    kw = dict(model=MODEL, prompt=PROMPTS[:2], max_tokens=20, n=2, **sampling)
    full = client.completions.create(**kw)
    texts, finish, usage = _streamed_texts(client.completions.create(
        stream=True, stream_options={"include_usage": True}, **kw))
    assert texts == {c.index: c.text for c in full.choices}
    assert finish == {c.index: c.finish_reason for c in full.choices}
    assert len(usage) == 1 and usage[0].completion_tokens == full.usage.completion_tokens
    assert usage[0].prompt_tokens == full.usage.prompt_tokens


def test_seed_reproducible_and_samples_differ(client):
    kw = dict(model=MODEL, prompt="Hello", max_tokens=16, temperature=1.0, n=3, seed=1234)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    c = client.completions.create(**{**kw, "seed": 4321})
    assert [x.text for x in c.choices] != [x.text for x in a.choices]


def test_stop_string_cuts_output(client):
    base = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[8:11]
    cut = base[:base.index(stop)]
    r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=24, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop
    texts, finish, _ = _streamed_texts(client.completions.create(
        model=MODEL, prompt="Hello world", max_tokens=24, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True}))
    assert texts == {0: cut} and finish == {0: "stop"}


def test_completion_logprobs_and_echo(client):
    prompt = "Flat is better than nested."  # not sent before: see the prefix-cache test below
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 4 and chosen <= 0  # top-3 + chosen; equal strings collapse
        assert all(v <= chosen + 1e-5 for v in top.values())  # greedy picks the top token
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    _check_echo(client, "Sparse is better than dense.")


def _check_echo(client, prompt: str) -> None:
    e = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=1,
                                  echo=True)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=1)
    elp = e.choices[0].logprobs
    assert e.choices[0].text == prompt + r.choices[0].text
    assert "".join(elp.tokens) == e.choices[0].text
    assert elp.token_logprobs[0] is None and all(x <= 0 for x in elp.token_logprobs[1:])
    assert elp.token_logprobs[-5:] == pytest.approx(r.choices[0].logprobs.token_logprobs, abs=1e-5)


def test_echo_logprobs_after_prefix_cache_hit(client):
    client.completions.create(model=MODEL, prompt="Now is better than never. Hello", max_tokens=2)
    _check_echo(client, "Now is better than never. Hello")


# ---- chat ---------------------------------------------------------------------------------
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How are you today?"}]


def test_chat_matches_offline_chat(client, oracle):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    want = oracle.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.outputs[0].text
    assert r.choices[0].finish_reason == want.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.object == "chat.completion"


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.8, seed=99)])
def test_chat_stream_equals_non_stream(client, sampling):
    kw = dict(model=MODEL, messages=MESSAGES, max_completion_tokens=16, n=2, **sampling)
    full = client.chat.completions.create(**kw)
    stream = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.object == "chat.completion.chunk" for c in stream)
    assert {c.choices[0].index for c in stream[:2]} == {0, 1}
    assert all(c.choices[0].delta.role == "assistant" for c in stream[:2])
    texts, finish, usage = _streamed_texts(stream)
    assert texts == {c.index: c.message.content for c in full.choices}
    assert finish == {c.index: c.finish_reason for c in full.choices}
    assert usage[0].total_tokens == full.usage.total_tokens


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)
        assert bytes(t.bytes).decode() == t.token


# ---- errors -------------------------------------------------------------------------------
def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    return err


def test_errors_openai_client(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hello world", max_tokens=500)
    assert "128" in e.value.message and "500" in e.value.message
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="hi", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, top_p=0)
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.completions.create(model=MODEL, prompt="hi", stream_options={"include_usage": True})
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model=MODEL, prompt=[[1, 2, 10**6]])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


def test_cors_preflight_and_ping(server):
    """CORS as vLLM configures it (all origins by default, preflight without the API key; an
    explicit --allowed-origins list is enforced) and /ping as /health."""
    import asyncio

    from jaxpaged.serve.middleware import CORS

    preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(server.url + "/v1/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", "https://ui.example")
    assert httpx.get(server.url + "/ping").status_code == 200

    import types

    engine = types.SimpleNamespace(observer=None, stats=None)  # a preflight never reaches the engine
    app = build_app(engine, [MODEL], "tiny", cors=CORS(["https://ui.example"]))

    async def ask(origin: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.options("/v1/completions", headers={**preflight, "Origin": origin})

    assert asyncio.run(ask("https://ui.example")).headers["access-control-allow-origin"] == "https://ui.example"
    assert asyncio.run(ask("https://evil.example")).status_code == 400


VLLM_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:request_success_total")
VLLM_HISTOGRAMS = ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                   "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                   "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds")


def test_metrics_carry_vllms_names(server, client):
    """/metrics under vLLM's names with the model_name label; a finished request adds one
    observation to each per-request histogram and its tokens to the counters."""
    before = metrics(server)
    client.completions.create(model=MODEL, prompt="Hello world", max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    after = metrics(server)
    text = httpx.get(server.url + "/metrics").text
    for name in VLLM_METRICS:
        assert f'{name}{{' in text and 'model_name="tiny"' in text, name
    for name in VLLM_HISTOGRAMS:
        count = f'{name}_count{{model_name="tiny"}}'
        if name != "vllm:inter_token_latency_seconds":
            assert after[count] == before.get(count, 0) + 1, name
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 5
    assert not any(line.startswith("jaxpaged:") for line in text.splitlines())


# ---- vLLM's request fields ----------------------------------------------------------------
def _post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def _check_prompt_logprobs(entries: list, ids: list[int], n: int, hf: np.ndarray, tok) -> None:
    """vLLM's `prompt_logprobs` against HF: None first, then per position the prompt token and
    the top `n` as {token id: {logprob, rank, decoded_token}}."""
    assert len(entries) == len(ids) and entries[0] is None
    for pos, entry in enumerate(entries[1:]):
        want = hf[pos]
        assert {int(k) for k in entry} == {ids[pos + 1], *np.argsort(-want)[:n].tolist()}
        for k, v in entry.items():
            assert v["logprob"] == pytest.approx(want[int(k)], abs=1e-4)
            assert v["rank"] == 1 + int((want > want[int(k)] + 1e-6).sum())
            assert v["decoded_token"] == tok.decode([int(k)])


def test_prompt_logprobs_match_hf(server, client, oracle, hf_log_softmax):
    tok = oracle.get_tokenizer()
    prompt = "Beautiful is better than ugly."
    r = client.completions.create(model=MODEL, prompt=[prompt, "Simple"], max_tokens=2, temperature=0,
                                  extra_body={"prompt_logprobs": 3})
    for c, p in zip(r.choices, [prompt, "Simple"]):
        ids = tok.encode(p)
        _check_prompt_logprobs(c.model_extra["prompt_logprobs"], ids, 3, hf_log_softmax(ids), tok)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, extra_body={"prompt_logprobs": 0})
    ids = tok.encode(tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    _check_prompt_logprobs(chat.model_extra["prompt_logprobs"], ids, 0, hf_log_softmax(ids), tok)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert plain.choices[0].model_extra["prompt_logprobs"] is None
    err = _error(_post(server, "/v1/completions", {"prompt": "Hi", "prompt_logprobs": 1, "stream": True}), 400)
    assert "`prompt_logprobs`" in err["message"]
    assert "prompt_logprobs" in _error(_post(server, "/v1/completions", {"prompt": "Hi", "prompt_logprobs": 21}), 400)["message"]


def test_echo_with_max_tokens_0_returns_the_prompts_logprobs(server, client, oracle, hf_log_softmax):
    """lm-evaluation-harness's loglikelihood request: echo, max_tokens 0, logprobs."""
    tok = oracle.get_tokenizer()
    prompts = ["Errors should never pass silently.", "In the face of ambiguity"]
    r = client.completions.create(model=MODEL, prompt=[tok.encode(p) for p in prompts], max_tokens=0, echo=True,
                                  logprobs=2, temperature=0)
    for c, p in zip(r.choices, prompts):
        ids, lp = tok.encode(p), c.logprobs
        hf = hf_log_softmax(ids)
        assert c.text == p and c.finish_reason == "length"
        assert lp.tokens == [tok.decode([t]) for t in ids] and lp.token_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx([hf[i, t] for i, t in enumerate(ids[1:])], abs=1e-4)
        for i, top in enumerate(lp.top_logprobs[1:]):  # the token, then the top 2; equal strings: the later
            want = {tok.decode([t]): hf[i, t] for t in dict.fromkeys([ids[i + 1], *np.argsort(-hf[i])[:2].tolist()])}
            assert top.keys() == want.keys() and list(top.values()) == pytest.approx(list(want.values()), abs=1e-4)
    assert r.usage.completion_tokens == 0
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    stream = list(client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=0, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in stream) == prompts[0] and stream[-1].choices[0].finish_reason == "length"
    err = _error(_post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 0}), 400)
    assert "max_tokens" in err["message"]
    assert "max_tokens" in _error(_post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 0}), 400)["message"]


def test_allowed_token_ids(server, client, oracle):
    """The text of the offline API with the same field (checked against HF in
    tests/test_penalties_engine.py); out-of-vocab or empty lists are a 400."""
    allowed = list(range(100, 140))
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                  extra_body={"allowed_token_ids": allowed, "ignore_eos": True})
    kw = dict(temperature=0, max_tokens=8, ignore_eos=True)
    want = oracle.generate(PROMPTS[1], SamplingParams(allowed_token_ids=allowed, **kw), use_tqdm=False)[0].outputs[0]
    plain = oracle.generate(PROMPTS[1], SamplingParams(**kw), use_tqdm=False)[0].outputs[0]
    assert r.choices[0].text == want.text != plain.text and set(want.token_ids) <= set(allowed)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                          extra_body={"allowed_token_ids": allowed})
    assert chat.choices[0].message.content == oracle.chat(MESSAGES, SamplingParams(
        allowed_token_ids=allowed, temperature=0, max_tokens=6), use_tqdm=False)[0].outputs[0].text
    for bad in ([3, 512], []):
        err = _error(_post(server, "/v1/completions", {"prompt": "Hi", "allowed_token_ids": bad}), 400)
        assert "allowed_token_ids" in err["message"]


def test_bad_words(server, client, oracle):
    """As the offline API (vLLM's rule, checked against HF in tests/test_penalties_engine.py)."""
    kw = dict(temperature=0, max_tokens=12, ignore_eos=True)
    r = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0,
                                  extra_body={"bad_words": ["dellt", "mo"], "ignore_eos": True})
    want = oracle.generate("The quick brown fox", SamplingParams(bad_words=["dellt", "mo"], **kw), use_tqdm=False)
    plain = oracle.generate("The quick brown fox", SamplingParams(**kw), use_tqdm=False)
    assert r.choices[0].text == want[0].outputs[0].text != plain[0].outputs[0].text
    assert "bad_words" in _error(_post(server, "/v1/completions", {"prompt": "Hi", "bad_words": [" "]}), 400)["message"]


def test_truncate_prompt_tokens(server, client, oracle):
    """The last k prompt tokens: the same completion (and echo) as those tokens sent as the prompt."""
    ids = oracle.get_tokenizer().encode(PROMPTS[1])
    kw = dict(model=MODEL, max_tokens=8, temperature=0, echo=True)
    r = client.completions.create(prompt=PROMPTS[1], extra_body={"truncate_prompt_tokens": 3}, **kw)
    cut = client.completions.create(prompt=ids[-3:], **kw)
    full = client.completions.create(prompt=PROMPTS[1], **kw)
    assert r.choices[0].text == cut.choices[0].text != full.choices[0].text and r.usage.prompt_tokens == 3
    keep_all = client.completions.create(prompt=PROMPTS[1], extra_body={"truncate_prompt_tokens": -1}, **kw)
    assert keep_all.choices[0].text == full.choices[0].text  # -1: max_model_len
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                          extra_body={"truncate_prompt_tokens": 5})
    assert chat.usage.prompt_tokens == 5
    for k in (0, 129):
        err = _error(_post(server, "/v1/completions", {"prompt": "Hi", "truncate_prompt_tokens": k}), 400)
        assert "truncate_prompt_tokens" in err["message"]


def test_priority_0_only(server):
    """vLLM under its default (first come, first served) policy refuses other priorities."""
    assert _post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1, "priority": 0}).status_code == 200
    for path, body in (("/v1/completions", {"prompt": "Hi"}), ("/v1/chat/completions", {"messages": MESSAGES})):
        err = _error(_post(server, path, {**body, "priority": 1}), 400)
        assert "`priority`" in err["message"] and "Priority scheduling is not enabled" in err["message"]


TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if greeting %}{{ greeting }} {% endif %}{% if add_generation_prompt %}[assistant]{% endif %}")


def _rendered(tok, messages, **kw) -> list[int]:
    return tok.encode(tok.apply_chat_template(messages, tokenize=False, **kw), add_special_tokens=False)


def _chat_matches_prompt(client, oracle, ids: list[int], messages, **fields) -> str:
    """A greedy chat with `fields` has the prompt `ids` and the offline API's reply to them."""
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True, **fields})
    want = oracle.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert r.usage.prompt_tokens == len(ids) and r.choices[0].message.content == want.outputs[0].text
    return want.outputs[0].text


def test_chat_template_per_request(server, client, oracle):
    """The server here trusts request templates (--trust-request-chat-template); one that does
    not refuses them: `test_default_server_refuses_request_chat_templates`."""
    tok = oracle.get_tokenizer()
    ids = _rendered(tok, MESSAGES, chat_template=TEMPLATE, add_generation_prompt=True)
    assert ids != _rendered(tok, MESSAGES, add_generation_prompt=True)
    tokenized = _post(server, "/tokenize", {"messages": MESSAGES, "chat_template": TEMPLATE}).json()
    assert tokenized["tokens"] == ids
    _chat_matches_prompt(client, oracle, ids, MESSAGES, chat_template=TEMPLATE)
    assert "chat template" in _error(_post(server, "/v1/chat/completions", {
        "messages": MESSAGES, "chat_template": "{% for %}"}), 400)["message"]


def test_chat_template_kwargs(server, client, oracle):
    tok = oracle.get_tokenizer()
    kwargs = {"greeting": "Good morning"}
    ids = _rendered(tok, MESSAGES, chat_template=TEMPLATE, add_generation_prompt=True, **kwargs)
    assert ids != _rendered(tok, MESSAGES, chat_template=TEMPLATE, add_generation_prompt=True)
    body = {"messages": MESSAGES, "chat_template": TEMPLATE, "chat_template_kwargs": kwargs}
    assert _post(server, "/tokenize", body).json()["tokens"] == ids
    text = _chat_matches_prompt(client, oracle, ids, MESSAGES, chat_template=TEMPLATE, chat_template_kwargs=kwargs)
    offline = oracle.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False,
                          chat_template=TEMPLATE, chat_template_kwargs=kwargs)
    assert offline[0].outputs[0].text == text
    for reserved in ({"tokenize": True}, {"chat_template": TEMPLATE}):
        err = _error(_post(server, "/v1/chat/completions", {"messages": MESSAGES, "chat_template_kwargs": reserved}), 400)
        assert "chat_template_kwargs" in err["message"]


CONTINUED = [*MESSAGES, {"role": "assistant", "content": "I am fine and"}]


def test_continue_final_message(server, client, oracle):
    tok = oracle.get_tokenizer()
    ids = _rendered(tok, CONTINUED, add_generation_prompt=False, continue_final_message=True)
    assert tok.decode(ids).endswith("I am fine and")  # the message is left open
    fields = dict(add_generation_prompt=False, continue_final_message=True)
    text = _chat_matches_prompt(client, oracle, ids, CONTINUED, **fields)
    offline = oracle.chat(CONTINUED, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False,
                          **fields)
    assert offline[0].outputs[0].text == text
    err = _error(_post(server, "/v1/chat/completions", {"messages": CONTINUED, "continue_final_message": True}), 400)
    assert "`continue_final_message` and `add_generation_prompt`" in err["message"]


def test_chat_echo(client, oracle):
    """vLLM: the reply starts with the last message when its role is the reply's (the
    assistant's after a generation prompt, else the last message's own)."""
    kw = dict(model=MODEL, max_tokens=8, temperature=0, extra_body={"ignore_eos": True, "echo": True})
    fields = dict(add_generation_prompt=False, continue_final_message=True)
    r = client.chat.completions.create(messages=CONTINUED, **{**kw, "extra_body": {**kw["extra_body"], **fields}})
    plain = client.chat.completions.create(messages=CONTINUED, max_tokens=8, temperature=0, model=MODEL,
                                           extra_body={"ignore_eos": True, **fields})
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "I am fine and" + plain.choices[0].message.content
    stream = list(client.chat.completions.create(messages=CONTINUED, stream=True, **{**kw, "extra_body": {
        **kw["extra_body"], **fields}}))
    assert "".join(c.choices[0].delta.content or "" for c in stream) == r.choices[0].message.content
    reply = client.chat.completions.create(messages=MESSAGES, **kw)  # the user's message: another role
    assert reply.choices[0].message.content == client.chat.completions.create(
        messages=MESSAGES, model=MODEL, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content
    user = client.chat.completions.create(messages=MESSAGES, **{**kw, "extra_body": {
        **kw["extra_body"], "add_generation_prompt": False}})
    assert user.choices[0].message.role == "user"
    assert user.choices[0].message.content.startswith(MESSAGES[-1]["content"])


def test_request_id_names_the_response(server, client):
    """vLLM's `request_id` field, and the X-Request-Id header before it, give the response's id."""
    kw = dict(model=MODEL, max_tokens=2, extra_body={"request_id": "field-1"})
    assert client.completions.create(prompt="hi", **kw).id == "cmpl-field-1"
    assert client.chat.completions.create(messages=MESSAGES, **kw).id == "chatcmpl-field-1"
    chunks = list(client.chat.completions.create(messages=MESSAGES, stream=True, **kw,
                                                 extra_headers={"X-Request-Id": "header-1"}))
    assert {c.id for c in chunks} == {"chatcmpl-header-1"}
    assert client.completions.create(prompt="hi", model=MODEL, max_tokens=2).id.startswith("cmpl-")


def test_errors_raw_http(server):
    url, auth = server.url, {"Authorization": f"Bearer {KEY}"}
    assert _error(httpx.post(url + "/v1/completions", content=b"{not json", headers=auth), 400)["type"] == "BadRequestError"
    _error(httpx.post(url + "/v1/completions", json=[1, 2], headers=auth), 400)
    assert _error(httpx.post(url + "/v1/completions", json={"prompt": 3}, headers=auth), 400)["param"].startswith("prompt")
    _error(httpx.post(url + "/v1/chat/completions", json={"messages": []}, headers=auth), 400)
    _error(httpx.post(url + "/v1/completions", json={"prompt": "hi"}), 401)
    _error(httpx.get(url + "/v1/nothing", headers=auth), 404)
    _error(httpx.get(url + "/v1/completions", headers=auth), 405)
    _error(httpx.post(url + "/v1/completions", json={"prompt": "hi", "suffix": "x"}, headers=auth), 400)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for field, value in (("length_penalty", 0.5), ("modalities", ["text", "audio"]), ("prediction", {
            "type": "content", "content": "x"}), ("reasoning_effort", "low"), ("store", True),
            ("documents", [{"text": "d"}])):
        err = _error(httpx.post(url + "/v1/chat/completions", json=chat | {field: value}, headers=auth), 400)
        assert err["message"].endswith(f"`{field}` is not supported by jaxpaged"), err
    for field, value in (("length_penalty", 1.0), ("modalities", ["text"]), ("store", False)):  # ask for nothing
        assert httpx.post(url + "/v1/chat/completions", json=chat | {field: value}, headers=auth).status_code == 200
    tools = [{"type": "function", "function": {"name": "f"}}]
    for field, value in (("tools", tools), ("tool_choice", "required")):  # chat's fields
        err = _error(httpx.post(url + "/v1/completions", json={"prompt": "hi", field: value}, headers=auth), 400)
        assert f"`{field}` is a field of /v1/chat/completions" in err["message"]
    # tools without --enable-auto-tool-choice: tool_choice defaults to "auto", which needs it (vLLM's 400)
    err = _error(httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                "tools": tools}, headers=auth), 400)
    assert err["message"] == '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
    _error(httpx.post(url + "/detokenize", json={"tokens": [-1]}), 400)
    assert httpx.get(url + "/metrics").status_code == 200  # not behind the key, as in vLLM


# ---- batching and disconnects -------------------------------------------------------------
def test_64_concurrent_streams_match_one_at_a_time_and_batch(server, client):
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(64)]
    kw = dict(model=MODEL, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    sequential = [client.completions.create(prompt=p, **kw).choices[0].text for p in prompts]
    seen_running = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            seen_running.append(metrics(server)["vllm:num_requests_running"])
            time.sleep(0.01)

    async def one(aclient, p) -> str:
        stream = await aclient.completions.create(prompt=p, stream=True, **kw)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def run_all() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        async with aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    poller = threading.Thread(target=poll)
    step = server.core.step
    server.core.step = lambda: (time.sleep(0.005), step())[1]  # slow enough for the poller to see it
    try:
        poller.start()
        concurrent = asyncio.run(run_all())
    finally:
        done.set()
        poller.join()
        del server.core.step
    assert concurrent == sequential
    assert max(seen_running) > 1
    wait_idle(server)


def _slow_engine(server: Server, delay: float = 0.02):
    step = server.core.step
    server.core.step = lambda: (time.sleep(delay), step())[1]


def assert_aborted_once(before: dict[str, float], after: dict[str, float]) -> None:
    """Between the two `/metrics` readings one request was aborted before its 100 tokens."""
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 100
    key = 'vllm:request_success_total{finished_reason="abort",model_name="tiny"}'
    assert after[key] == before.get(key, 0) + 1


def test_disconnect_mid_stream_frees_blocks(server):
    before = metrics(server)
    _slow_engine(server)
    try:
        body = {"model": MODEL, "prompt": "Hello world", "max_tokens": 100, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert metrics(server)["vllm:kv_cache_usage_perc"] > 0
        after = wait_idle(server)  # running 0, waiting 0, no referenced KV blocks
    finally:
        del server.core.step
    assert server.core.block_manager.num_free_blocks == server.core.block_manager.num_total_blocks
    assert_aborted_once(before, after)


def test_disconnect_non_streaming_frees_blocks(server):
    before = metrics(server)
    _slow_engine(server)
    try:
        body = {"model": MODEL, "prompt": "Hello world", "max_tokens": 100, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=0.3,
                       headers={"Authorization": f"Bearer {KEY}"})
        after = wait_idle(server)
    finally:
        del server.core.step
    assert_aborted_once(before, after)


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_while_the_request_is_being_added_aborts_it(server, stream):
    """A client that leaves while its request is still being added (a long prompt to tokenize,
    say) gets it aborted once the add completes, not generated for nobody."""
    before = metrics(server)
    add = server.core.add_request
    server.core.add_request = lambda *a, **kw: (time.sleep(0.6), add(*a, **kw))[1]
    try:
        body = {"model": MODEL, "prompt": "Hello world", "max_tokens": 100, "ignore_eos": True, "stream": stream}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=0.2,
                       headers={"Authorization": f"Bearer {KEY}"})
        time.sleep(0.8)  # the add has run on the engine thread by now
        after = wait_idle(server)
    finally:
        del server.core.add_request
    assert_aborted_once(before, after)


def test_prompts_are_tokenized_off_the_engine_thread(server, client):
    """Text -> ids for /tokenize, completions and chat runs on the tokenizer thread, never on
    the engine thread, whose steps every stream waits on (a long prompt would stall them all)."""
    tok = server.llm.tokenizer
    threads, encode, template = [], tok.encode, tok.apply_chat_template

    def recording(fn):
        def call(*a, **kw):
            threads.append(threading.current_thread().name)
            return fn(*a, **kw)
        return call

    tok.encode, tok.apply_chat_template = recording(encode), recording(template)
    try:
        r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"})
        assert r.status_code == 200 and r.json()["tokens"] == encode("Hello world")
        client.completions.create(model=MODEL, prompt=["Hello world", "The quick"], max_tokens=2)
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    finally:
        del tok.encode, tok.apply_chat_template
    assert len(threads) >= 5 and all(name.startswith("jaxpaged-tokenizer") for name in threads), threads


def test_a_huge_prompt_being_tokenized_delays_no_small_request(server):
    """While a 4 MB prompt is tokenized (seconds), a small completion still completes within 1 s:
    tokenizing runs off the event loop, large inputs on a thread of their own."""
    huge = "Hello world, this is a long prompt. " * (4_000_000 // 36)
    started = threading.Event()
    result = {}

    def send_huge() -> None:
        started.set()
        result["r"] = httpx.post(server.url + "/tokenize", json={"prompt": huge}, timeout=120)

    thread = threading.Thread(target=send_huge)
    thread.start()
    started.wait()
    time.sleep(1.0)  # the 4 MB body is in and being tokenized
    t0 = time.monotonic()
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    elapsed = time.monotonic() - t0
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert thread.is_alive(), "the huge prompt was tokenized too fast to test anything"
    assert elapsed < 1.0, elapsed
    thread.join()
    assert result["r"].status_code == 200 and result["r"].json()["count"] > 4_000_000 // 36


def test_request_body_over_the_limit_gets_413_before_it_is_read(server):
    """A body over --max-request-body-size: 413 from Content-Length alone (the body is never
    sent), and 413 for a chunked body once it passes the limit."""
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {BODY_LIMIT + 1}\r\n\r\n".encode())
        head = s.recv(65536).decode()
    assert head.startswith("HTTP/1.1 413"), head
    assert "larger than the server's limit" in head

    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(BODY_LIMIT // (1 << 20) + 1):
            yield b"a" * (1 << 20)
        yield b'"}'

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"Authorization": f"Bearer {KEY}"})
    assert _error(r, 413)["message"].startswith("the request body is larger")
    small = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
                       headers={"Authorization": f"Bearer {KEY}"})
    assert small.status_code == 200


# ---- fuzz ---------------------------------------------------------------------------------
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                     max_leaves=6)
_garbage = _json | st.sampled_from([-1, 0, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 1e30, -1e30, "", [], {}])
_ids = st.lists(st.integers(0, 511), min_size=1, max_size=6)
_VALID = {  # mostly valid values, so that generation runs too
    "max_tokens": st.integers(1, 6), "n": st.integers(1, 3), "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50), "min_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2), "seed": st.integers(-(2**63), 2**64 - 1),
    "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 511), max_size=3), "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 3), "logit_bias": st.dictionaries(st.integers(0, 511).map(str), st.floats(-100, 100), max_size=3),
    "stream": st.booleans(), "stream_options": st.just({"include_usage": True}), "model": st.sampled_from([MODEL, "tiny-alias"]),
    "allowed_token_ids": st.lists(st.integers(0, 511), min_size=1, max_size=4),
    "bad_words": st.lists(st.text(min_size=1, max_size=4), max_size=3), "truncate_prompt_tokens": st.integers(-1, 8),
    "prompt_logprobs": st.integers(0, 3), "priority": st.integers(-1, 1),
}
_COMPLETION = {**_VALID, "logprobs": st.integers(0, 5), "echo": st.booleans(), "max_tokens": st.integers(0, 6)}
_CHAT = {**_VALID, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5), "max_completion_tokens": st.integers(1, 6),
         "echo": st.booleans(), "add_generation_prompt": st.booleans(), "continue_final_message": st.booleans(),
         "chat_template": st.sampled_from([TEMPLATE, "{{ messages[0]['content'] }}", "{% if %}"]),
         "chat_template_kwargs": st.dictionaries(st.sampled_from(["greeting", "tokenize", "x"]), _json, max_size=2),
         "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
             {"name": st.sampled_from(["f", "g", ""])}, optional={"parameters": _json})}), max_size=2),
         "tool_choice": st.sampled_from(["none", "auto", "required", {"type": "function", "function": {"name": "f"}}]),
         "parallel_tool_calls": st.booleans()}
_tool_calls = st.lists(st.fixed_dictionaries({"id": st.text(max_size=4), "type": st.just("function"), "function": (
    st.fixed_dictionaries({"name": st.text(max_size=4), "arguments": st.sampled_from(['{"a": 1}', "{", "[]"]) | _json}))}),
    max_size=2)
_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]),
                                            "content": st.text(max_size=12)},
                                           optional={"tool_calls": _tool_calls, "tool_call_id": st.text(max_size=4)}),
                     min_size=1, max_size=3)
_BODIES = {
    "/v1/completions": st.fixed_dictionaries(
        {"prompt": st.text(min_size=1, max_size=20) | _ids | st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=3)
         | st.lists(_ids, min_size=1, max_size=2)}, optional=_COMPLETION),
    "/v1/chat/completions": st.fixed_dictionaries({"messages": _messages}, optional=_CHAT),
    "/tokenize": st.fixed_dictionaries({}, optional={"prompt": st.text(max_size=20), "messages": _messages,
                                                     "add_special_tokens": st.booleans(), "return_token_strs": st.booleans()}),
    "/detokenize": st.fixed_dictionaries({"tokens": st.lists(st.integers(0, 511), max_size=6)}),
}


@st.composite
def _request(draw) -> tuple[str, object]:
    """A path and a body: valid-ish, with at most one field replaced by garbage, or garbage only."""
    path = draw(st.sampled_from(sorted(_BODIES)))
    body = draw(_BODIES[path])
    mutation = draw(st.none() | st.tuples(st.sampled_from([*_COMPLETION, *_CHAT, "prompt", "messages", "tokens"]), _garbage))
    if mutation is not None:
        body[mutation[0]] = mutation[1]
    return path, draw(st.just(body) | _json) if draw(st.integers(0, 9)) == 0 else body


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=_request())
def test_fuzz_request_bodies_never_5xx(server, request):
    path, body = request
    data = json.dumps(body, allow_nan=True)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
        r = h.post(path, content=data.encode())
        text = r.text
    assert r.status_code < 500, (body, text)
    event(f"{path} -> {r.status_code}")
    if r.status_code >= 400:
        _error(r, r.status_code)
    elif path.startswith("/v1") and isinstance(body, dict) and body.get("stream") is True:
        assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text, text
    assert server.llm.alive


# ---- a server with the defaults, then engine death -----------------------------------------
@pytest.fixture(scope="module")
def default_server(model_dir):
    s = start_server(model_dir)
    yield s
    s.stop()


def test_default_server_refuses_request_chat_templates(default_server):
    """As vLLM without --trust-request-chat-template."""
    r = httpx.post(default_server.url + "/v1/chat/completions", json={"messages": MESSAGES, "chat_template": TEMPLATE})
    assert "--trust-request-chat-template" in _error(r, 400)["message"]


def test_dead_engine_gives_503(default_server):
    """(Breaks `default_server`: the last test using it.)"""
    s = default_server
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
    assert c.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text is not None

    def broken():
        raise RuntimeError("device lost")

    s.core.step = broken
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert e.value.status_code == 503
    assert httpx.get(s.url + "/health").status_code == 503
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert e.value.status_code == 503


def test_add_special_tokens_and_spaces_between_special_tokens_are_honoured(server, model_dir, tmp_path):
    """vLLM's defaults, through a second API server on the same core whose tokenizer adds a BOS:
    a completion's prompt gets the tokenizer's special tokens, a chat's rendered template does
    not (it spells them), /tokenize as its kind; either way when asked.
    `spaces_between_special_tokens` reaches the detokenizer's parameters."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from jaxpaged.serve.protocol import CompletionRequest

    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (model_dir / f).is_file():
            (tmp_path / f).write_bytes((model_dir / f).read_bytes())
    fast = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    bos = fast.token_to_id("<|endoftext|>")
    fast.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    fast.save(str(tmp_path / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    plain = tok.encode("Hello world", add_special_tokens=False)
    rendered = tok.encode(tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)
    llm = AsyncLLM(server.core_address, server.core.info, tokenizer=str(tmp_path))
    url, front, thread = serve(build_app(llm, [MODEL], str(model_dir)))
    try:
        def prompt_tokens(route: str, body: dict) -> int:
            r = httpx.post(url + route, json=body | {"model": MODEL, "max_tokens": 1}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens"]

        assert prompt_tokens("/v1/completions", {"prompt": "Hello world"}) == len(plain) + 1
        assert prompt_tokens("/v1/completions", {"prompt": "Hello world", "add_special_tokens": False}) == len(plain)
        assert prompt_tokens("/v1/chat/completions", {"messages": MESSAGES}) == len(rendered)
        assert prompt_tokens("/v1/chat/completions", {"messages": MESSAGES, "add_special_tokens": True}) == \
            len(rendered) + 1
        assert httpx.post(url + "/tokenize", json={"prompt": "Hello world"}).json()["tokens"] == [bos] + plain
        assert httpx.post(url + "/tokenize", json={"messages": MESSAGES}).json()["tokens"] == rendered
    finally:
        front.should_exit = True
        thread.join(timeout=30)
    for value in (True, False):
        req = CompletionRequest(prompt="x", spaces_between_special_tokens=value, skip_special_tokens=False)
        assert req.sampling_params(4, None).spaces_between_special_tokens is value


def test_return_tokens_as_token_ids(server, client, model_dir):
    """vLLM's `token_id:N` logprob tokens (chat and completions, chosen and top, echoed prompt
    too): the request's field, else the server's --return-tokens-as-token-ids. The ids decode
    to the tokens the same request names in text."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    kw = dict(model=MODEL, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})

    def ids(tokens: list[str]) -> list[int]:
        assert all(t.startswith("token_id:") for t in tokens), tokens
        return [int(t.removeprefix("token_id:")) for t in tokens]

    def completion(base_client, as_ids: bool | None):
        extra = {} if as_ids is None else {"return_tokens_as_token_ids": as_ids}
        body = kw | {"extra_body": kw["extra_body"] | extra}
        return base_client.completions.create(prompt="Hello world", logprobs=2, echo=True, **body).choices[0].logprobs

    text, as_id = completion(client, None), completion(client, True)
    assert [tok.decode([i]) for i in ids(as_id.tokens)] == text.tokens and len(text.tokens) > 4  # echo + 4
    # text keys collapse tokens that decode alike (e.g. partial characters); ids keep each one
    assert [{tok.decode([i]) for i in ids(list(top))} for top in as_id.top_logprobs[1:]] == \
        [set(top) for top in text.top_logprobs[1:]]
    assert as_id.token_logprobs == text.token_logprobs
    chat = [client.chat.completions.create(messages=MESSAGES, logprobs=True, top_logprobs=2, **(kw | {
        "extra_body": kw["extra_body"] | {"return_tokens_as_token_ids": v}})).choices[0].logprobs.content
        for v in (False, True)]
    assert [tok.decode([i]) for i in ids([c.token for c in chat[1]])] == [c.token for c in chat[0]]
    assert [bytes(c.bytes).decode() for c in chat[1]] == [c.token for c in chat[1]]
    assert [tok.decode([i]) for c in chat[1] for i in ids([t.token for t in c.top_logprobs])] == \
        [t.token for c in chat[0] for t in c.top_logprobs]
    # the server's flag: the default of a request that does not say
    llm = AsyncLLM(server.core_address, server.core.info)
    url, front, thread = serve(build_app(llm, [MODEL], str(model_dir), return_tokens_as_token_ids=True))
    try:
        flagged = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        assert ids(completion(flagged, None).tokens) == ids(as_id.tokens)
        assert completion(flagged, False).tokens == text.tokens
    finally:
        front.should_exit = True
        thread.join(timeout=30)


def test_cache_salt_shares_the_prefix_cache_only_under_the_same_salt(server, client):
    """vLLM's `cache_salt`: a prompt cached under one salt is a miss under another and without
    one, a hit under the same; an empty salt is a 400."""
    kw = dict(model=MODEL, prompt="Salted prompts keep to their own tenant's cache blocks " * 2, max_tokens=1)

    def hits(**extra) -> float:
        before = metrics(server)["vllm:prefix_cache_hits_total"]
        client.completions.create(**kw, extra_body=extra)
        return metrics(server)["vllm:prefix_cache_hits_total"] - before

    assert hits() == 0  # now cached without a salt
    assert hits(cache_salt="tenant-a") == 0  # now under tenant-a's too
    assert hits(cache_salt="tenant-b") == 0
    assert hits(cache_salt="tenant-a") > 0 and hits() > 0
    with pytest.raises(openai.BadRequestError, match="cache_salt"):
        client.completions.create(**kw, extra_body={"cache_salt": ""})
