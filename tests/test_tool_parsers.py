"""Tool-call and reasoning parsers on replies as their model families write them (canned
texts), whole and streamed: each expected call's arguments are compared as parsed JSON (the
oracle: `json.loads` of the expected object), and a stream fed in small random pieces must
concatenate to the whole reply's result. The `tool_choice` schemas are checked with
`jsonschema`. No engine runs here."""
from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxpaged.serve.chat_messages import ChatCompletionNamedToolChoiceParam, ChatCompletionToolsParam
from jaxpaged.serve.reasoning import get_reasoning_parser
from jaxpaged.serve.reply_parser import ReplyParser
from jaxpaged.serve.tool_parsers import TOOL_PARSERS, get_tool_parser
from jaxpaged.serve.tool_parsers.tool_choice import NamedToolParser, RequiredToolParser, tool_choice_schema

PARIS = {"city": "Paris"}
# parser -> [(reply text, content, [(name, arguments)])]
CANNED = {
    "hermes": [  # Qwen2.5 / Qwen3 / Hermes / SmolLM
        ("I'll look up both.\n<tool_call>\n{\"name\": \"get_current_temperature\", \"arguments\": {\"location\": "
         "\"San Francisco, CA, USA\", \"unit\": \"celsius\"}}\n</tool_call>\n<tool_call>\n{\"name\": "
         "\"get_temperature_date\", \"arguments\": {\"location\": \"San Francisco, CA, USA\", \"date\": \"2024-10-01\"}}"
         "\n</tool_call>", "I'll look up both.\n",
         [("get_current_temperature", {"location": "San Francisco, CA, USA", "unit": "celsius"}),
          ("get_temperature_date", {"location": "San Francisco, CA, USA", "date": "2024-10-01"})]),
        ("<tool_call>\n{\"arguments\": {\"symbol\": \"TSLA\"}, \"name\": \"get_stock_fundamentals\"}\n</tool_call>",
         None, [("get_stock_fundamentals", {"symbol": "TSLA"})]),  # Hermes 2 Pro: arguments first
        ("<tool_call>\n{\"name\": \"get_current_time\", \"arguments\": {}}\n</tool_call>", None, [("get_current_time", {})]),
        ("<tool_call>[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"get_news\", "
         "\"arguments\": {\"topic\": \"tech\", \"limit\": 3}}]</tool_call>", None,  # SmolLM2: a list in one block
         [("get_weather", PARIS), ("get_news", {"topic": "tech", "limit": 3})]),
        ("<tool_call>\n{\"name\": \"send_message\", \"arguments\": {\"to\": \"Zoë\", \"text\": \"He said \\\"hi\\\" "
         "{not json} 🙂</tool_call>\", \"tags\": [\"a\", {\"k\": null}], \"priority\": -1.5e2, \"urgent\": true}}\n</tool_call>",
         None, [("send_message", {"to": "Zoë", "text": "He said \"hi\" {not json} 🙂</tool_call>", "tags": ["a", {"k": None}],
                                  "priority": -150.0, "urgent": True})]),
        ("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}", None, [("get_weather", PARIS)]),
        ("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\nHope this helps!",
         None, [("get_weather", PARIS)]),  # text after the last block is dropped, as vLLM
        ("The capital of France is Paris. <b>Tags</b> like <tool are fine.", "The capital of France is Paris. <b>Tags</b> "
         "like <tool are fine.", []),
    ],
    "llama3_json": [  # Llama 3.1 / 3.2
        ("{\"name\": \"get_current_conditions\", \"parameters\": {\"location\": \"San Francisco, CA\", \"unit\": "
         "\"Fahrenheit\"}}", None, [("get_current_conditions", {"location": "San Francisco, CA", "unit": "Fahrenheit"})]),
        ("<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}; {\"name\": \"get_weather\", "
         "\"parameters\": {\"city\": \"London\"}}", None, [("get_weather", PARIS), ("get_weather", {"city": "London"})]),
        ("{\"type\": \"function\", \"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}", None,
         [("get_weather", PARIS)]),
        ("Let me search for that.<|python_tag|>{\"name\": \"search\", \"parameters\": {\"query\": \"paged attention\"}}",
         "Let me search for that.", [("search", {"query": "paged attention"})]),
        ("\n\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"UTC\"}}", None, [("get_time", {"tz": "UTC"})]),
        ("Paris is the capital of France.", "Paris is the capital of France.", []),
    ],
    "mistral": [  # Mistral 7B v0.3, Nemo, Small; v11 tokenizers: Small 3.2, Magistral, Devstral
        ("[TOOL_CALLS] [{\"name\": \"get_current_weather\", \"arguments\": {\"location\": \"Paris, France\", \"format\": "
         "\"celsius\"}}]", None, [("get_current_weather", {"location": "Paris, France", "format": "celsius"})]),
        ("[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"get_weather\", "
         "\"arguments\": {\"city\": \"Rome\"}, \"id\": \"abc123xyz\"}]", None,
         [("get_weather", PARIS), ("get_weather", {"city": "Rome"})]),
        ("[{\"name\": \"get_current_weather\", \"arguments\": {\"location\": \"Paris, France\"}}]", None,  # marker skipped
         [("get_current_weather", {"location": "Paris, France"})]),
        ("[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\", \"unit\": \"celsius\"}", None,
         [("get_weather", {"city": "Paris", "unit": "celsius"})]),
        ("Let me check both.[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}[TOOL_CALLS]get_time[ARGS]{\"timezone\": "
         "\"Europe/Paris\"}", "Let me check both.", [("get_weather", PARIS), ("get_time", {"timezone": "Europe/Paris"})]),
        ("[1] Paris is the capital of France.", "[1] Paris is the capital of France.", []),
    ],
    "granite": [  # Granite 3.0 (<|tool_call|>), 3.1+ (<tool_call>)
        ("<|tool_call|>[{\"name\": \"get_current_weather\", \"arguments\": {\"location\": \"Boston, MA\"}}]", None,
         [("get_current_weather", {"location": "Boston, MA"})]),
        ("Sure, I can check that.\n<tool_call>[{\"name\": \"get_stock_price\", \"arguments\": {\"ticker\": \"IBM\"}}, "
         "{\"name\": \"get_stock_price\", \"arguments\": {\"ticker\": \"RHT\"}}]", "Sure, I can check that.\n",
         [("get_stock_price", {"ticker": "IBM"}), ("get_stock_price", {"ticker": "RHT"})]),
        (" [{\"name\": \"list_files\", \"arguments\": {}}]", None, [("list_files", {})]),
        ("IBM was founded in 1911.", "IBM was founded in 1911.", []),
    ],
    "pythonic": [  # Llama 3.2 / Llama 4 / ToolACE
        ("[get_weather(city='San Francisco', metric='celsius'), get_time(timezone=\"America/Los_Angeles\")]", None,
         [("get_weather", {"city": "San Francisco", "metric": "celsius"}), ("get_time", {"timezone": "America/Los_Angeles"})]),
        ("[get_current_time()]", None, [("get_current_time", {})]),
        ("<|python_start|>[search(query=\"paged attention\", top_k=5)]<|python_end|>", None,
         [("search", {"query": "paged attention", "top_k": 5})]),
        ("[create_event(title=\"Stand-up: \\\"daily\\\", (9am)\", attendees=['a@x.io', \"b@y.io\"], duration=0.5, "
         "recurring=True, location=None, meta={'room': (1, 2)}, note='''it's ]''')]", None,
         [("create_event", {"title": "Stand-up: \"daily\", (9am)", "attendees": ["a@x.io", "b@y.io"], "duration": 0.5,
                            "recurring": True, "location": None, "meta": {"room": [1, 2]}, "note": "it's ]"})]),
        ("[\n  get_weather(city=\"Paris\"),\n  get_weather(city=\"London\",)\n]", None,
         [("get_weather", PARIS), ("get_weather", {"city": "London"})]),
        ("Let me look.<|python_start|>[calendar.lookup(day=\"Mon\")]<|python_end|>", "Let me look.",
         [("calendar.lookup", {"day": "Mon"})]),
        ("Call get_weather(city='Paris') yourself.", "Call get_weather(city='Paris') yourself.", []),
    ],
}
MALFORMED = {  # replies that are not well-formed calls: all content, whole; a stream must not fail
    "hermes": ["<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}\n</tool_call>",
               "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \"Paris\"}\n</tool_call>",
               "<tool_call>\nget_weather(city=\"Paris\")\n</tool_call>",
               "<tool_call>\n{\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
               "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par",
               "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"n\": 1,}}\n</tool_call>"],
    "llama3_json": ["{\"name\": \"get_weather\", \"parameters\": {\"city\": }}", "{\"city\": \"Paris\"}",
                    "{\"name\": \"f\", \"parameters\": {}} and then some text", "{\"name\": 3, \"parameters\": {}}"],
    "mistral": ["[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"a\": 1}", "[TOOL_CALLS]get weather[ARGS]{}",
                "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"a\": 1}}] trailing"],
    "granite": ["<|tool_call|>[{\"name\": \"f\", \"arguments\": {\"a\": 1}}] trailing",
                "<tool_call>{\"name\": \"f\", \"arguments\": {}}", "<tool_call>[]"],
    "pythonic": ["[get_weather('Paris')]", "[get_weather(city=paris_var)]", "[get_weather(city=\"Paris\"]",
                 "[get_weather(**kw)]", "[]", "[f(a={1, 2})]", "[f(a=float('nan'))]"],
}
ID = {"mistral": re.compile(r"[A-Za-z0-9]{9}")}
DEFAULT_ID = re.compile(r"chatcmpl-tool-[0-9a-f]{32}")


def chunks(text: str, seed: int) -> list[str]:
    """`text` in random pieces of 1-6 characters (a detokenizer's deltas)."""
    rng, out, i = random.Random(seed), [], 0
    while i < len(text):
        k = rng.randint(1, 6)
        out.append(text[i:i + k])
        i += k
    return out


def stream(parser, text: str, seed: int) -> tuple[str, list[dict], list]:
    """Feed `text` in pieces: the streamed content, the calls as the deltas build them
    ({"id", "name", "arguments"}), and every tool-call delta in order."""
    deltas = [d for piece in chunks(text, seed) if (d := parser.extract_tool_calls_streaming(piece))]
    if last := parser.extract_tool_calls_streaming("", finished=True):
        deltas.append(last)
    calls: list[dict] = []
    tool_deltas = [t for d in deltas for t in d.tool_calls]
    for t in tool_deltas:
        if t.index == len(calls):  # a call's first delta carries its id, type and name
            assert t.id is not None and t.type == "function" and t.function.name, t
            calls.append({"id": t.id, "name": t.function.name, "arguments": t.function.arguments or ""})
        else:
            assert t.index < len(calls), "a call's first delta comes before its fragments"
            assert t.id is None and t.function.name is None and t.function.arguments
            calls[t.index]["arguments"] += t.function.arguments
    return "".join(d.content or "" for d in deltas), calls, tool_deltas


CASES = [(name, *case) for name, cases in CANNED.items() for case in cases]


@pytest.mark.parametrize("name,text,content,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_whole_reply(name, text, content, expected):
    info = get_tool_parser(name)().extract_tool_calls(text)
    assert info.tools_called == bool(expected)
    assert info.content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in info.tool_calls] == expected
    assert all(ID.get(name, DEFAULT_ID).fullmatch(c.id) and c.type == "function" for c in info.tool_calls)
    assert len({c.id for c in info.tool_calls}) == len(expected)


@pytest.mark.parametrize("name,text,content,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_stream_concatenates_to_the_whole_reply(name, text, content, expected):
    whole = get_tool_parser(name)().extract_tool_calls(text)
    for seed in range(12):
        parser = get_tool_parser(name)()
        got_content, calls, _ = stream(parser, text, seed)
        assert got_content == (whole.content or ""), seed
        assert [(c["name"], c["arguments"]) for c in calls] == \
            [(c.function.name, c.function.arguments) for c in whole.tool_calls], seed
        assert parser.tools_called == bool(expected)


def test_stream_sends_arguments_in_fragments_as_they_arrive():
    """A call's name goes out as soon as it is complete, then its arguments piece by piece,
    before the call is closed."""
    text = CANNED["hermes"][0][0]
    parser = get_tool_parser("hermes")()
    sent_before_close = []
    for piece in chunks(text, 0):
        if (d := parser.extract_tool_calls_streaming(piece)) and d.tool_calls:
            sent_before_close.append("</tool_call>" not in parser._text[parser._text.find("get_current"):])
    assert sum(sent_before_close) >= 4  # the name and several fragments of the first call's arguments


@pytest.mark.parametrize("name,text", [(n, t) for n, texts in MALFORMED.items() for t in texts])
def test_malformed_replies_are_content(name, text):
    info = get_tool_parser(name)().extract_tool_calls(text)
    assert not info.tools_called and info.tool_calls == [] and info.content == text
    for seed in range(4):
        stream(get_tool_parser(name)(), text, seed)  # no exception
    content, calls, _ = stream(get_tool_parser(name)(), text, 0)
    if not calls:  # malformed before any call's name was complete: the stream is the same content
        assert content == text


def test_every_registered_parser_has_canned_replies():
    assert set(TOOL_PARSERS) == set(CANNED) == set(MALFORMED) == {"hermes", "llama3_json", "mistral", "granite",
                                                                   "pythonic"}


# ---- reasoning -----------------------------------------------------------------------------
REASONING = [  # (parser, the prompt opened the block, reply, reasoning_content, content)
    ("qwen3", False, "<think>\nOkay, the user asks for 2+2. That's 4.\n</think>\n\nThe answer is **4**.",
     "\nOkay, the user asks for 2+2. That's 4.\n", "\n\nThe answer is **4**."),
    ("qwen3", False, "The answer is 4.", None, "The answer is 4."),  # enable_thinking false
    ("qwen3", True, "Let me think: 2+2=4.\n</think>\n\n4", "Let me think: 2+2=4.\n", "\n\n4"),  # Thinking-2507
    ("qwen3", False, "<think>\nStill thinking about </thin", "\nStill thinking about </thin", None),
    ("deepseek_r1", False, "Okay, so I need to add 2 and 2.\n</think>\n\n**Answer:** 4",
     "Okay, so I need to add 2 and 2.\n", "\n\n**Answer:** 4"),
    ("deepseek_r1", False, "<think>\nHmm, 2+2.\n</think>\n\n4", "\nHmm, 2+2.\n", "\n\n4"),
    ("deepseek_r1", False, "<think>\nStill thinking", "\nStill thinking", None),
    ("deepseek_r1", False, "</think>Direct answer.", None, "Direct answer."),
]


@pytest.mark.parametrize("name,opened,text,reasoning,content", REASONING)
def test_reasoning_whole_and_streamed(name, opened, text, reasoning, content):
    cls = get_reasoning_parser(name)
    out = cls(opened).extract_reasoning_content(text)
    assert (out.reasoning_content, out.content) == (reasoning, content)
    for seed in range(8):
        parser = cls(opened)
        deltas = [d for piece in chunks(text, seed) if (d := parser.extract_reasoning_content_streaming(piece))]
        deltas.append(parser.extract_reasoning_content_streaming("", finished=True))
        assert "".join(d.reasoning_content or "" for d in deltas if d) == (reasoning or "")
        assert "".join(d.content or "" for d in deltas if d) == (content or "")


def test_prompt_opens_reasoning():
    qwen3 = get_reasoning_parser("qwen3")
    assert qwen3.prompt_opens("<|im_start|>assistant\n<think>\n")
    assert not qwen3.prompt_opens("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # enable_thinking false
    assert not qwen3.prompt_opens("<|im_start|>assistant\n")


def test_reasoning_then_tool_calls_and_parallel_tool_calls_false():
    """Qwen3 thinks, then calls two tools: reasoning, content and calls split, whole and
    streamed alike; with parallel_tool_calls false only the first call is kept."""
    text = "<think>\nTwo lookups.\n</think>\n\nChecking.\n" + CANNED["hermes"][0][0].split("\n", 1)[1]
    for parallel in (True, False):
        def parser() -> ReplyParser:
            return ReplyParser(get_reasoning_parser("qwen3")(), get_tool_parser("hermes")(), parallel)

        whole = parser().parse(text)
        assert (whole.reasoning_content, whole.content) == ("\nTwo lookups.\n", "\n\nChecking.\n")
        assert [c.function.name for c in whole.tool_calls] == \
            ["get_current_temperature", "get_temperature_date"][:2 if parallel else 1]
        for seed in range(6):
            p = parser()
            deltas = [p.stream(piece, False) for piece in chunks(text, seed)] + [p.stream("", True)]
            assert "".join(d.reasoning_content or "" for d in deltas) == whole.reasoning_content
            assert "".join(d.content or "" for d in deltas) == whole.content
            names = [t.function.name for d in deltas for t in d.tool_calls if t.function.name]
            assert names == [c.function.name for c in whole.tool_calls] and p.tools_called


# ---- tool_choice "required" and named: the schema structured output holds replies to ----------
TOOLS = [ChatCompletionToolsParam.model_validate(t) for t in [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"$ref": "#/$defs/unit"}},
        "required": ["city"], "$defs": {"unit": {"enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {"name": "get_time"}},
]]


def test_required_schema_holds_replies_to_the_tools():
    schema = tool_choice_schema(TOOLS, "required")
    jsonschema.Draft202012Validator.check_schema(schema)
    ok = [[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}],
          [{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Rome"}}]]
    bad = [[], [{"name": "get_weather", "parameters": {"unit": "celsius"}}],
           [{"name": "get_weather", "parameters": {"city": "Paris", "unit": "kelvin"}}],
           [{"name": "delete_all", "parameters": {}}], [{"name": "get_time"}], {"name": "get_time", "parameters": {}}]
    for reply in ok:
        jsonschema.validate(reply, schema)
        info = RequiredToolParser().extract_tool_calls(json.dumps(reply))
        assert [(c.function.name, json.loads(c.function.arguments)) for c in info.tool_calls] == \
            [(r["name"], r["parameters"]) for r in reply]
        streamed = stream(RequiredToolParser(), json.dumps(reply), 1)[1]
        assert [c["arguments"] for c in streamed] == [c.function.arguments for c in info.tool_calls]
    for reply in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(reply, schema)
    one = tool_choice_schema(TOOLS, "required", parallel_tool_calls=False)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(ok[1], one)
    assert "$defs" in TOOLS[0].function.parameters  # the request's tools are left as they were


def test_named_schema_is_the_functions_parameters():
    named = ChatCompletionNamedToolChoiceParam.model_validate({"type": "function", "function": {"name": "get_weather"}})
    schema = tool_choice_schema(TOOLS, named)
    assert schema == TOOLS[0].function.parameters
    reply = '{"city": "Paris", "unit": "celsius"}'
    jsonschema.validate(json.loads(reply), schema)
    info = NamedToolParser("get_weather").extract_tool_calls(reply)
    assert [(c.function.name, c.function.arguments) for c in info.tool_calls] == [("get_weather", reply)]
    assert stream(NamedToolParser("get_weather"), reply, 2)[1][0]["arguments"] == reply
    no_params = ChatCompletionNamedToolChoiceParam.model_validate({"function": {"name": "get_time"}})
    assert tool_choice_schema(TOOLS, no_params) == {"type": "object", "properties": {}}
    assert tool_choice_schema(TOOLS, "auto") is None and tool_choice_schema(TOOLS, "none") is None


def test_required_schema_refuses_conflicting_defs():
    other = ChatCompletionToolsParam.model_validate({"function": {"name": "f", "parameters": {
        "type": "object", "$defs": {"unit": {"enum": ["kelvin"]}}}}})
    with pytest.raises(ValueError, match="Tool definition 'unit' has multiple schemas"):
        tool_choice_schema([*TOOLS, other], "required")


_PIECES = ["<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "<|tool_call|>", "<|python_start|>",
           "<|python_end|>", "{", "}", "[", "]", "(", ")", '"name"', '"arguments"', '"parameters"', ": ", ", ", "; ", "=",
           '"f"', '"x\\"y"', "'a'", "1", "-2.5", "true", "null", "f", "g.h", "x", "\n", " ", "\\", '"', "<", "</"]


@st.composite
def _replies(draw) -> tuple[str, str]:
    """A parser and a reply: the formats' pieces strung together, or a canned reply with a
    piece inserted or a slice cut out."""
    name = draw(st.sampled_from(sorted(CANNED)))
    if draw(st.booleans()):
        return name, "".join(draw(st.lists(st.sampled_from(_PIECES), max_size=24)))
    text = draw(st.sampled_from([t for t, _, _ in CANNED[name] + [(t, 0, 0) for t in MALFORMED[name]]]))
    i = draw(st.integers(0, len(text)))
    j = draw(st.integers(i, min(len(text), i + 8)))
    return name, text[:i] + draw(st.sampled_from(["", *_PIECES])) + text[j:]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(reply=_replies(), seed=st.integers(0, 2**16))
def test_any_reply_parses_without_error_and_streams_consistently(reply, seed):
    """No exception on any reply; one with calls streams to the same content and calls; one
    without, streamed without sending a call, to the same content."""
    name, text = reply
    whole = get_tool_parser(name)().extract_tool_calls(text)
    content, calls, _ = stream(get_tool_parser(name)(), text, seed)
    if whole.tools_called:
        assert content == (whole.content or "")
        assert [(c["name"], c["arguments"]) for c in calls] == [(c.function.name, c.function.arguments)
                                                               for c in whole.tool_calls]
    elif not calls:
        assert content == text
