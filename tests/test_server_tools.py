"""Tool calling and reasoning through the server, checked with the `openai` client.

A random-weight model cannot decide to call a tool, so these tests script its replies: the
engine core runs for real (prompt, scheduling, `max_tokens`), and a wrapper around its step
replaces each sampled token id with the next id of a canned reply before the API server sees
it. Everything after the sampler is the server's own: detokenizing, the reasoning and tool
parsers, the response and SSE chunks, the client's parsing. The parsers themselves are tested
on each model family's formats in tests/test_tool_parsers.py. One server (tests/test_server.py's
engine shapes) with `--enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser qwen3`
and a chat template that renders tools, tool calls and tool messages."""
from __future__ import annotations

import collections
import contextlib
import json
import re
import types

import httpx
import jsonschema
import openai
import pytest
from test_server import MODEL, start_server
from transformers import AutoTokenizer

from jaxpaged import LLM

TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t.function.name }}"
    "{% if detail %}: {{ t.function.description }} {{ t.function.parameters | default({}) | tojson }}{% endif %};"
    "{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}</tool_call> city={{ c.function.arguments.city }} id={{ c.id }}\n{% endfor %}"
    "{% elif m.role == 'tool' %}<tool_response id={{ m.tool_call_id }}>{{ m.content }}</tool_response>\n"
    "{% else %}{{ m.content }}\n{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if think %}<think>\n{% endif %}{% endif %}")
WEATHER = {"type": "function", "function": {"name": "w", "description": "The weather in a city.", "parameters": {
    "type": "object", "properties": {"c": {"type": "string"}}, "required": ["c"]}}}
TIME = {"type": "function", "function": {"name": "t", "description": "The time."}}
TOOLS = [WEATHER, TIME]
HI = [{"role": "user", "content": "Hi"}]
# a short Qwen3-style reply (the tiny model's context is 128 tokens): reasoning, content, two calls
REPLY = ('<think>\nW\n</think>\nOK<tool_call>{"name": "w", "arguments": {"c": "P"}}</tool_call>'
         '<tool_call>{"name": "t"}</tool_call>')
ID = re.compile(r"chatcmpl-tool-[0-9a-f]{32}")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def server(model_dir):
    s = start_server(model_dir, chat_template=TEMPLATE, tool_parser="hermes", reasoning_parser="qwen3")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tok(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@contextlib.contextmanager
def scripted(server, tok, reply: str):
    """The core's sampled tokens replaced, in order, by `reply`'s ids; yields the request fields
    that make a reply exactly that long."""
    ids = tok.encode(reply, add_special_tokens=False)
    assert tok.decode(ids) == reply
    step, given = server.core.step, collections.Counter()

    def step_scripted():
        outputs = step()
        for o in outputs.outputs:
            at = given[o.request_id, o.index]
            o.new_token_ids = ids[at:at + len(o.new_token_ids)]
            given[o.request_id, o.index] += len(o.new_token_ids)
        return outputs

    server.core.step = step_scripted
    try:
        yield dict(model=MODEL, max_tokens=len(ids), extra_body={"ignore_eos": True})
    finally:
        del server.core.step


def streamed(chunks) -> tuple[dict, list[dict], list[str | None]]:
    """A stream's message (content, reasoning_content), its calls as the deltas build them, and
    the finish reasons."""
    message, calls, reasons = {"content": "", "reasoning_content": ""}, [], []
    for chunk in chunks:
        choice = chunk.choices[0]
        reasons.append(choice.finish_reason)
        message["content"] += choice.delta.content or ""
        message["reasoning_content"] += getattr(choice.delta, "reasoning_content", None) or ""
        for d in choice.delta.tool_calls or []:
            if d.index == len(calls):
                assert d.id and d.type == "function" and d.function.name
                calls.append({"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""})
            else:
                assert d.id is None and d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments
    return message, calls, reasons


def test_tool_calls_whole_and_streamed(server, client, tok):
    with scripted(server, tok, REPLY) as kw:
        r = client.chat.completions.create(messages=HI, tools=TOOLS, **kw)
        stream = list(client.chat.completions.create(messages=HI, tools=TOOLS, stream=True, **kw))
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert (choice.message.content, choice.message.reasoning_content) == ("\nOK", "\nW\n")
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("w", {"c": "P"}), ("t", {})]
    assert all(ID.fullmatch(c.id) and c.type == "function" for c in calls) and calls[0].id != calls[1].id
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    assert r.usage.completion_tokens == kw["max_tokens"]

    message, stream_calls, reasons = streamed(stream)
    assert message == {"content": "\nOK", "reasoning_content": "\nW\n"}
    assert [(c["name"], c["arguments"]) for c in stream_calls] == [(c.function.name, c.function.arguments) for c in calls]
    assert reasons[-1] == "tool_calls" and set(reasons[:-1]) == {None}
    fragments = [d for c in stream for d in c.choices[0].delta.tool_calls or [] if d.index == 0]
    assert len(fragments) > 2  # the name, then the arguments in several pieces


def test_parallel_tool_calls_false_keeps_the_first(server, client, tok):
    with scripted(server, tok, REPLY) as kw:
        r = client.chat.completions.create(messages=HI, tools=TOOLS, parallel_tool_calls=False, **kw)
        stream = list(client.chat.completions.create(messages=HI, tools=TOOLS, parallel_tool_calls=False,
                                                     stream=True, **kw))
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["w"]
    assert [c["name"] for c in streamed(stream)[1]] == ["w"]


def test_no_call_is_content_and_tool_choice_none_parses_nothing(server, client, tok):
    with scripted(server, tok, "Sunny <tool") as kw:
        r = client.chat.completions.create(messages=HI, tools=TOOLS, **kw)
        stream = streamed(client.chat.completions.create(messages=HI, tools=TOOLS, stream=True, **kw))
    assert (r.choices[0].message.content, r.choices[0].message.tool_calls) == ("Sunny <tool", None)
    assert r.choices[0].finish_reason == "length" and stream[0]["content"] == "Sunny <tool" and stream[2][-1] == "length"
    with scripted(server, tok, REPLY) as kw:
        r = client.chat.completions.create(messages=HI, tools=TOOLS, tool_choice="none", **kw)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.endswith("</tool_call>")  # the reasoning parser still splits


def test_reasoning_opened_by_the_prompt(server, client, tok):
    """The template opens `<think>` in the prompt: the reply is reasoning up to `</think>`."""
    with scripted(server, tok, "Hmm.\n</think>\nHello") as kw:
        r = client.chat.completions.create(messages=HI, **{**kw, "extra_body": {
            **kw["extra_body"], "chat_template_kwargs": {"think": True}}})
        plain = client.chat.completions.create(messages=HI, **kw)
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == ("Hmm.\n", "\nHello")
    assert (plain.choices[0].message.reasoning_content, plain.choices[0].message.content) == \
        (None, "Hmm.\n</think>\nHello")


HISTORY = [
    {"role": "user", "content": "Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"city": "P"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "Sun"},
]


def test_tool_history_and_tools_reach_the_template(server, client, tok):
    """An assistant's tool calls (arguments as dicts, as HF templates read them) and the tool's
    answer are rendered as transformers renders them; the tools too."""
    as_dicts = [{**m, "content": m["content"] or ""} for m in HISTORY]
    as_dicts[1]["tool_calls"] = [{**c, "function": {**c["function"], "arguments": {"city": "P"}}}
                                 for c in HISTORY[1]["tool_calls"]]
    text = tok.apply_chat_template(as_dicts, tools=TOOLS, chat_template=TEMPLATE, tokenize=False,
                                   add_generation_prompt=True, detail=True)
    assert "city=P id=c1" in text and "<tool_response id=c1>Sun" in text
    assert '"required": ["c"]' in text
    r = httpx.post(server.url + "/tokenize", json={"messages": HISTORY, "tools": TOOLS,
                                                   "chat_template_kwargs": {"detail": True}}).json()
    assert r["tokens"] == tok.encode(text, add_special_tokens=False)
    short = tok.apply_chat_template(as_dicts[1:], tools=TOOLS, chat_template=TEMPLATE, tokenize=False,
                                    add_generation_prompt=True)  # 121 tokens: the context is 128
    chat = client.chat.completions.create(model=MODEL, messages=HISTORY[1:], tools=TOOLS, tool_choice="none",
                                          max_tokens=1)
    assert chat.usage.prompt_tokens == len(tok.encode(short, add_special_tokens=False))


def test_llm_chat_passes_tools_and_tool_history_to_the_template(tok):
    """`LLM.chat(messages, tools=...)` renders what the server renders (no engine: `generate`
    returns the prompt ids it gets)."""
    llm = object.__new__(LLM)
    llm.engine = types.SimpleNamespace(tokenizer=tok)
    llm.generate = lambda prompt_ids, params, use_tqdm: prompt_ids
    ids = llm.chat(HISTORY, tools=TOOLS, chat_template=TEMPLATE)[0]
    text = tok.decode(ids)
    assert "w;t;" in text and "city=P id=c1" in text and "<tool_response id=c1>Sun" in text
    with pytest.raises(ValueError, match="name"):
        llm.chat(HI, tools=[{"type": "function", "function": {"description": "no name"}}], chat_template=TEMPLATE)


# bounded arguments, so that a random-weight model's constrained reply ends within max_tokens
PICK = {"type": "function", "function": {"name": "pick", "parameters": {
    "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                     "s": {"enum": ["a", "b"]}},
    "required": ["n", "s"], "additionalProperties": False}}}
FLAG = {"type": "function", "function": {"name": "flag", "parameters": {
    "type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"], "additionalProperties": False}}}


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_choice_hold_the_model_to_the_tools(client, stream):
    """`required` and a named function constrain the (random-weight) model's reply with the
    tools' schemas: the openai SDK reads calls whose arguments validate against their tool."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (PICK, FLAG)}
    for choice in ("required", {"type": "function", "function": {"name": "flag"}}):
        calls = []
        for seed in range(3):
            kw = dict(model=MODEL, messages=HI, tools=[PICK, FLAG], tool_choice=choice, max_tokens=60,
                      temperature=1.0, seed=seed, parallel_tool_calls=False)
            if stream:
                _, got, _ = streamed(client.chat.completions.create(stream=True, **kw))
                calls += [(c["name"], c["arguments"]) for c in got]
            else:
                r = client.chat.completions.create(**kw)
                calls += [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]
        assert len(calls) == 3
        for name, arguments in calls:
            assert choice == "required" or name == "flag"
            jsonschema.validate(json.loads(arguments), schemas[name])


BAD = [  # (request fields, text in the 400's message)
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "must be a JSON schema of type object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "parameters"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
    ({"tools": [WEATHER, WEATHER]}, "two functions named 'w'"),
    ({"tools": []}, "`tools` must not be an empty array"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "does not match any"),
    ({"tool_choice": "auto"}, "`tools` must be set"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "w"}}, "guided_regex": "a+"},
     "cannot be combined"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "w", "arguments": "{not json"}}]}]}, "messages.0.tool_calls.0.function.arguments"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "only assistant messages"),
    ({"functions": [{"name": "f"}]}, "`functions` is not supported"),
]


@pytest.mark.parametrize("fields,message", BAD, ids=[m for _, m in BAD])
def test_bad_tool_requests_get_400(server, fields, message):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": HI, **fields})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
