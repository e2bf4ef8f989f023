"""Structured output (engine/structured_output/): every output of the random-weight tiny model
follows its constraint, checked by independent oracles (jsonschema, `re`, the openai SDK's
pydantic parsing); grammar rows and free rows share a batch without a compile or a change to
the free rows; dead ends stop; bad specs are a 400. The engines use tests/test_server.py's
shapes, so the compiled steps are shared."""
from __future__ import annotations

import json
import re
import sys
import time
from typing import Literal

import httpx
import numpy as np
import openai
import pytest
import transformers
from _json_schemas import SCHEMAS
from jsonschema import Draft202012Validator
from pydantic import BaseModel, Field
from test_server import ENGINE, MODEL, start_server

from jaxpaged import LLM, SamplingParams, StructuredOutputsParams
from jaxpaged.engine.sample.token_mask import make_token_bitmask
from jaxpaged.engine.structured_output import compiler
from jaxpaged.engine.structured_output.request import StructuredOutputRequest

PROMPT = "Answer:"
REGEXES = [r"[a-z]{3}-\d{2}", r"(yes|no) [0-9]", r"[A-F0-9]{4}", r"\+?[0-9]{2,4}", r"(ab|cd){1,3}x?"]
CHOICES = [["yes", "no"], ["red", "green", "blue"], ['say "hi"', "a\\b", "ünï"]]
GRAMMAR = 'root ::= "(" num ("+" num)? ")"\nnum ::= [0-9] | [1-9] [0-9]'
FREE = [SamplingParams(temperature=0, max_tokens=12), SamplingParams(temperature=0.9, seed=7, max_tokens=12),
        SamplingParams(temperature=0, presence_penalty=1.0, max_tokens=12)]


def structured(i: int, **constraint) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=i, max_tokens=100, structured_outputs=StructuredOutputsParams(**constraint))


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, **ENGINE)


@pytest.fixture(scope="module")
def batch(llm, compile_counter):
    """One generate: a row per schema, regex, choice, the grammar and json_object, and free
    rows between them; the compiles it caused."""
    params = ([structured(i, json=s) for i, s in enumerate(SCHEMAS)] + [structured(i, regex=r) for i, r in enumerate(REGEXES)]
              + [structured(i, choice=c) for i, c in enumerate(CHOICES)]
              + [structured(0, grammar=GRAMMAR), structured(0, json_object=True)])
    params[3:3], params[20:20], params[-1:-1] = FREE[:1], FREE[1:2], FREE[2:]
    compiles = compile_counter.count
    outs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    return [(p, o.outputs[0]) for p, o in zip(params, outs)], compile_counter.count - compiles


def _rows(batch, kind: str) -> list:
    return [(getattr(p.structured_outputs, kind), out) for p, out in batch[0]
            if p.structured_outputs is not None and p.structured_outputs.kind == kind]


def test_every_output_validates_against_its_json_schema(batch):
    rows = _rows(batch, "json")
    assert len(rows) == len(SCHEMAS) >= 30
    for schema, out in rows:
        assert out.finish_reason == "stop", (schema, out.text)
        Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER).validate(json.loads(out.text))
        between = re.sub(r'"(?:[^"\\]|\\.)*"', '""', out.text)  # whitespace outside strings:
        assert not re.search(r"(?<![:,])\s|\s\s", between), out.text  # one space after : and , only


def test_regex_choice_grammar_and_json_object_outputs_match(batch):
    for regex, out in _rows(batch, "regex"):
        assert out.finish_reason == "stop" and re.fullmatch(regex, out.text), (regex, out.text)
    for choice, out in _rows(batch, "choice"):
        assert out.finish_reason == "stop" and out.text in choice, (choice, out.text)
    [(_, out)] = _rows(batch, "grammar")
    assert re.fullmatch(r"\((\d|[1-9]\d)(\+(\d|[1-9]\d))?\)", out.text), out.text
    [(_, out)] = _rows(batch, "json_object")
    assert isinstance(json.loads(out.text), dict)


def test_free_rows_beside_grammar_rows_are_unchanged_and_nothing_compiles(batch, llm):
    """The free rows (greedy, seeded sampling, penalties) of the mixed batch equal the same
    requests run alone: the grammar rows' masks touch no other row. The mixed batch ran on
    warm-up's programs."""
    mixed = [out for p, out in batch[0] if p.structured_outputs is None]
    alone = [o.outputs[0] for o in llm.generate([PROMPT] * len(FREE), FREE, use_tqdm=False)]
    assert [o.token_ids for o in mixed] == [o.token_ids for o in alone]
    assert batch[1] == 0, "the engine compiled after warm-up"


LARK = """?start: "(" num ("+" num)? ")"  // a sum, in Lark
num: digit
   | nonzero digit
digit: "0" | nonzero
nonzero: '1' | '2' | '3' | '4' | '5' | '6' | '7' | '8' | '9'"""


def test_a_lark_grammar_is_read_as_its_ebnf(llm):
    """vLLM's xgrammar backend converts Lark grammars (no `::=`) to EBNF; so does the compiler."""
    params = [structured(seed, grammar=LARK) for seed in range(3)]
    for out in llm.generate([PROMPT] * 3, params, use_tqdm=False):
        assert re.fullmatch(r"\((\d|[1-9]\d)(\+(\d|[1-9]\d))?\)", out.outputs[0].text), out.outputs[0].text


def test_dead_end_and_terminated_grammar_stop(llm):
    """After "yes" the grammar allows only EOS, which min_tokens bans: no token is allowed, and
    the request stops (greedy and sampled) with what the grammar accepted. With ignore_eos the
    grammar terminates on EOS, and the request stops there too."""
    yes = StructuredOutputsParams(choice=["yes"])
    params = [SamplingParams(temperature=0, min_tokens=5, max_tokens=10, structured_outputs=yes),
              SamplingParams(temperature=1.0, seed=1, min_tokens=5, max_tokens=10, structured_outputs=yes),
              SamplingParams(temperature=0, ignore_eos=True, max_tokens=10, structured_outputs=yes)]
    outs = [o.outputs[0] for o in llm.generate([PROMPT] * 3, params, use_tqdm=False)]
    assert [(o.text, o.finish_reason) for o in outs] == [("yes", "stop")] * 3
    assert len(outs[2].token_ids) == len(outs[0].token_ids) + 1  # the EOS the grammar ended on


def test_each_of_n_samples_follows_the_grammar(llm):
    """n samples share the compiled grammar, each with its own matcher."""
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=20,
                            structured_outputs=StructuredOutputsParams(regex=REGEXES[4]))
    outs = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs
    assert len({o.text for o in outs}) > 1 and all(re.fullmatch(REGEXES[4], o.text) for o in outs), outs


def test_bitmask_row_of_a_grammar_disallows_padding_ids_and_meets_allowed_token_ids(model_dir):
    """Logits wider than the tokenizer (padding ids): the grammar's row never allows them. A
    JSON object starts with "{": every allowed token's text does, and allowed_token_ids narrows
    the row to its own ids; a row without constraints allows everything."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    vocab = len(tok) + 40
    grammars = compiler.GrammarCompiler(str(model_dir), vocab, (tok.eos_token_id,))
    req = StructuredOutputRequest(grammars.submit(StructuredOutputsParams(json_object=True)))
    brace, letter = tok.convert_tokens_to_ids("{"), tok.convert_tokens_to_ids("a")
    rows = [(SamplingParams(), ()), (SamplingParams(allowed_token_ids=[brace, letter]), ()), (SamplingParams(), ())]
    req.grammar.result(timeout=30)
    mask = make_token_bitmask(rows, 4, vocab, [req, StructuredOutputRequest(req.grammar), None])
    bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
    allowed = np.flatnonzero(bits[0])
    assert brace in allowed and not bits[0, len(tok):].any()
    assert all(tok.decode([t]).startswith("{") for t in allowed)
    assert np.flatnonzero(bits[1]).tolist() == [brace]
    assert bits[2:].all()


def test_compiled_grammars_are_cached_by_spec_and_evicted_past_the_budget(model_dir, monkeypatch):
    grammars = compiler.GrammarCompiler(str(model_dir), 512, (2,))
    a, b = StructuredOutputsParams(regex="a+"), StructuredOutputsParams(regex="b+")
    first = grammars.compile(a)
    assert grammars.compile(StructuredOutputsParams(regex="a+")) is first  # an equal spec: the cache
    monkeypatch.setattr(compiler, "CACHE_BYTES", first.memory_size_bytes)  # room for one
    grammars.compile(b)
    assert grammars.compile(a) is not first  # a was least recently used: compiled anew


def test_without_xgrammar_a_structured_request_is_refused_naming_the_extra(model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` raises ImportError
    grammars = compiler.GrammarCompiler(str(model_dir), 512, (2,))
    with pytest.raises(ValueError, match=re.escape("structured output needs xgrammar: pip install 'jaxpaged[structured]'")):
        grammars.compile(StructuredOutputsParams(regex="a"))


class Pet(BaseModel):
    name: str = Field(max_length=8)
    kind: Literal["cat", "dog"]
    age: int = Field(ge=0, le=30)
    tags: list[Literal["a", "b"]] = Field(max_length=2)


@pytest.fixture(scope="module")
def server(model_dir, llm):  # after `llm`: the engine reuses its compiled steps
    s = start_server(model_dir)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_openai_sdk_parse_returns_the_pydantic_object(client):
    for seed in range(3):
        done = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "A pet?"}],
                                             response_format=Pet, temperature=1.0, seed=seed)
        assert isinstance(done.choices[0].message.parsed, Pet), done.choices[0].message.content


def test_server_forms_regex_choice_and_streamed_json(client):
    """vLLM's structured_outputs and guided_* extras and OpenAI's json_object, in completions
    and chat; a streamed JSON schema's deltas concatenate to valid JSON."""
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20,
                                    extra_body={"structured_outputs": {"regex": REGEXES[0]}})
    assert re.fullmatch(REGEXES[0], out.choices[0].text)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, extra_body={"guided_choice": CHOICES[1]})
    assert out.choices[0].text in CHOICES[1]
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}], max_tokens=50,
                                         extra_body={"guided_regex": REGEXES[2]})
    assert re.fullmatch(REGEXES[2], out.choices[0].message.content)
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}], max_tokens=90,
                                         response_format={"type": "json_object"}, temperature=1.0, seed=0)  # seed 0 closes its object in time
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    schema = SCHEMAS[0]
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}], stream=True,
                                            seed=3, extra_body={"guided_json": schema})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    Draft202012Validator(schema).validate(json.loads(text))


TAG_SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                              "ok": {"type": "boolean"}}, "required": ["n", "ok"]}


def test_structural_tags_hold_their_schema(server, model_dir):
    """vLLM's structural_tag forms: free text until a trigger, then `begin`, JSON of the tag's
    schema, `end`. `<` (the trigger) is pushed far above every other token, so the free text
    keeps opening tags; each closed tag's content validates. xgrammar's `format` form is a tag
    and nothing else. A tag's JSON allows any whitespace (xgrammar's rule): whitespace tokens
    are banned, so that the random model closes its tags."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    bias = {i: -100 for i in range(len(tok)) if tok.decode([i]) and not tok.decode([i]).strip()}
    tag = {"type": "structural_tag", "structures": [{"begin": "<", "schema": TAG_SCHEMA, "end": ">"}], "triggers": ["<"]}
    fmt = {"type": "structural_tag", "format": {"type": "tag", "begin": "<f>", "end": "</f>",
                                                "content": {"type": "json_schema", "json_schema": TAG_SCHEMA}}}
    base = {"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 40}
    for body in ({"response_format": tag}, {"structured_outputs": {"structural_tag": json.dumps(tag)}}):
        r = httpx.post(server.url + "/v1/completions",
                       json={**base, **body, "logit_bias": bias | {tok.convert_tokens_to_ids("<"): 100}})
        text = r.json()["choices"][0]["text"]
        assert re.fullmatch(r"(<[^<>]*>)+(<[^<>]*)?", text), text
        for content in re.findall(r"<([^<>]*)>", text):
            Draft202012Validator(TAG_SCHEMA).validate(json.loads(content))
    r = httpx.post(server.url + "/v1/completions", json={**base, "response_format": fmt, "logit_bias": bias})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and re.fullmatch(r"<f>(.*)</f>", choice["text"]), choice
    Draft202012Validator(TAG_SCHEMA).validate(json.loads(choice["text"][3:-4]))


ENDPOINTS = (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "?"}]}))
BIG_SCHEMA = {"type": "object", "properties": {f"k{i}": {"type": "array", "items": {"type": "object", "properties": {
    "a": {"type": "string", "pattern": "[a-z]{3,9}"}, "b": {"type": "number", "minimum": -5, "maximum": 5}}}}
    for i in range(60)}}


@pytest.mark.parametrize("body,message", [
    ({"guided_json": {"type": "foo"}}, "invalid JSON schema for structured outputs: Unsupported type \"foo\""),
    ({"guided_json": "{not json"}, "the JSON schema is not valid JSON"),
    ({"structured_outputs": {"regex": "(ab"}}, "invalid regex for structured outputs"),
    ({"structured_outputs": {"grammar": "root ::= foo"}}, "invalid grammar (EBNF) for structured outputs"),
    ({"structured_outputs": {"choice": []}}, "choice must be a non-empty list of strings"),
    ({"structured_outputs": {"grammar": "start: foo"}}, "invalid grammar (Lark) for structured outputs: rules used but not defined: foo"),
    ({"guided_grammar": "%import common.WS\nstart: WS"}, "Lark directives (%import) are not supported"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one of json, regex, choice"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "unsupported field(s) ['whitespace_pattern']"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "at most one structured output form"),
    ({"response_format": {"type": "json_schema"}}, "`json_schema` must be given exactly when"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
    ({"response_format": {"type": "structural_tag"}}, "needs `structures` and `triggers`, or `format`"),
    ({"response_format": {"type": "structural_tag", "structures": [{"begin": "<", "end": ">"}], "triggers": ["<"]}},
     "response_format.structures.0.schema"),
    ({"structured_outputs": {"structural_tag": {"type": "structural_tag", "format": {"type": "x"}}}},
     "invalid structural tag for structured outputs: Invalid structural tag error: Format type not recognized: x"),
    ({"response_format": {"type": "json_object", "triggers": ["<"]}}, "belong to the structural_tag type"),
    ({"guided_whitespace_pattern": " "}, "`guided_whitespace_pattern` is not supported"),
])
def test_bad_structured_output_requests_are_a_400_naming_the_problem(server, body, message):
    for path, base in ENDPOINTS:
        r = httpx.post(server.url + path, json={"model": MODEL, "max_tokens": 5, **base, **body})
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_a_schema_that_does_not_compile_in_time_is_a_400_naming_it(server, monkeypatch):
    """Past the timeout the request is refused; the compile goes on and is cached, so the same
    schema is served afterwards."""
    monkeypatch.setattr(compiler, "COMPILE_TIMEOUT_S", 0.01)
    for path, base in ENDPOINTS:
        body = {"model": MODEL, "max_tokens": 5, **base, "guided_json": {**BIG_SCHEMA, "title": path}}
        r = httpx.post(server.url + path, json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == (f"structured outputs: the JSON schema {json.dumps(body['guided_json'], separators=(',', ':'))[:120] + '...'!r} "
                                                "did not compile within 0.01 s")
        monkeypatch.setattr(compiler, "COMPILE_TIMEOUT_S", 30)
        assert httpx.post(server.url + path, json=body).status_code == 200
        monkeypatch.setattr(compiler, "COMPILE_TIMEOUT_S", 0.01)


def test_fill_threads_follow_the_cpu_quota_not_the_machine(monkeypatch, tmp_path):
    """xgrammar's "auto" threads count the machine's cores; a container's quota may allow far
    fewer. The usable CPUs but two fill the bitmask, at most 16."""
    from jaxpaged.engine.structured_output.request import fill_threads

    monkeypatch.setattr(compiler.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    real_open = open
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(
        quota if path == "/sys/fs/cgroup/cpu.max" else path, *a, **k))
    for text, cpus, threads in (("400000 100000\n", 4, 2), ("250000 100000\n", 3, 1), ("150000 100000\n", 2, 1), ("max 100000\n", 64, 16)):
        quota.write_text(text)
        assert (compiler.usable_cpus(), fill_threads()) == (cpus, threads)
    quota.unlink()  # no cgroup v2 quota: the affinity
    assert compiler.usable_cpus() == 64
    v1 = {"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": tmp_path / "quota", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": tmp_path / "period"}
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(v1.get(path, path), *a, **k))
    v1["/sys/fs/cgroup/cpu/cpu.cfs_period_us"].write_text("100000\n")
    for text, cpus in (("600000\n", 6), ("-1\n", 64)):  # cgroup v1: its quota, or -1 for none
        v1["/sys/fs/cgroup/cpu/cpu.cfs_quota_us"].write_text(text)
        assert compiler.usable_cpus() == cpus


class _Row:
    """A grammar whose bitmask row takes `seconds` to fill on one thread."""
    reasoning_ended = True

    def __init__(self, seconds: float):
        self.matcher = self
        self.seconds = seconds


def _filler_and_calls(budget_s, recheck_every, threaded_s=0.0):
    """A BitmaskFiller over a fake fill that records (rows, threads): on one thread it spends
    each row's `seconds` of CPU time (busy, as xgrammar's fill does), on the threads it waits
    `threaded_s` (wall time, no CPU)."""
    from jaxpaged.engine.structured_output import request

    calls = []

    def fill(matchers, mask, rows, threads):
        calls.append((list(rows), threads))
        if threads == 1:
            t0 = time.thread_time()
            while time.thread_time() - t0 < sum(m.seconds for m in matchers):
                pass
        else:
            time.sleep(threaded_s)
        mask[rows] = np.asarray(rows)[:, None] + 1

    return request.BitmaskFiller(budget_s=budget_s, recheck_every=recheck_every, first_chunk=2, fill=fill,
                                 threads=8), calls


def test_bitmask_filler_uses_one_thread_while_cheap_and_the_threads_past_the_budget():
    """One thread in growing chunks (2, then 8, ...) while the fill's CPU time fits the budget;
    past it the rest and the next `recheck_every` fills on the threads, then one thread again."""
    filler, calls = _filler_and_calls(budget_s=0.1, recheck_every=2)
    many = 8
    mask = np.zeros((13, 1), np.int32)
    filler(mask, [_Row(0.0)] * 12 + [None])  # cheap: chunks of 2, 8, then the last 2
    assert calls == [([0, 1], 1), (list(range(2, 10)), 1), ([10, 11], 1)]
    assert mask[:, 0].tolist() == list(range(1, 13)) + [0]
    calls.clear()
    # 2 rows in 0.06 s: the other 3 at that rate would make 0.15 s > 0.1 s, so they and the
    # next two fills go to the threads
    filler(mask, [_Row(0.03)] * 5)
    filler(mask, [_Row(0.03)] * 5)
    filler(mask, [_Row(0.0)] * 5)
    assert calls == [([0, 1], 1), ([2, 3, 4], many), ([0, 1, 2, 3, 4], many), ([0, 1, 2, 3, 4], many)]
    calls.clear()
    # one thread again, against a budget of the threads' time (here none: 0.1 s -> 0.056 s):
    # 2 rows take 0.02 s, the next 8 would make 0.1 s: they and the last 2 go to the threads
    filler(mask, [_Row(0.01)] * 12)
    assert calls == [([0, 1], 1), (list(range(2, 12)), many)] and 0.05 < filler.budget_s < 0.06
    calls.clear()
    filler(mask, [_Row(0.0)] * 5)
    filler(mask, [_Row(0.0)] * 5)
    filler(mask, [_Row(0.0)] * 5)  # after two threaded fills one thread again
    assert calls == [([0, 1, 2, 3, 4], many), ([0, 1, 2, 3, 4], many), ([0, 1], 1), ([2, 3, 4], 1)]


def test_bitmask_filler_budget_follows_the_threads():
    """The budget becomes the threads' measured wall time per fill: where the threads take 0.2 s,
    a fill of 0.04 s of CPU time stays on one thread, though over the first budget of 0.01 s."""
    filler, calls = _filler_and_calls(budget_s=0.01, recheck_every=2, threaded_s=0.2)
    mask = np.zeros((8, 1), np.int32)
    filler(mask, [_Row(0.005)] * 8)  # 2 rows: 0.01 s; with 6 more, 0.04 s > 0.01 s
    filler(mask, [_Row(0.005)] * 8)
    filler(mask, [_Row(0.005)] * 8)  # two threaded fills of 0.2 s raise the budget to ~0.09 s
    filler(mask, [_Row(0.005)] * 8)
    assert calls[-2:] == [([0, 1], 1), (list(range(2, 8)), 1)] and filler.budget_s > 0.08


def test_bitmask_filler_does_not_count_waits_as_fill_cost():
    """A cheap fill that waits (for the GIL, beside the engine thread) stays on one thread:
    the chunks are timed in CPU time, not wall time."""
    from jaxpaged.engine.structured_output import request

    calls = []

    def fill(matchers, mask, rows, threads):
        calls.append((list(rows), threads))
        time.sleep(0.05)  # waiting, not filling

    filler = request.BitmaskFiller(budget_s=0.01, recheck_every=2, first_chunk=4, fill=fill, threads=8)
    filler(np.zeros((64, 1), np.int32), [_Row(0.0)] * 64)
    assert calls == [(list(range(4)), 1), (list(range(4, 20)), 1), (list(range(20, 64)), 1)]
