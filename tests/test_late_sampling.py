"""Late sampling inputs (EngineCore.step, ModelRunner.launches_late): a step whose head reads
the requests' histories (grammar bitmask, penalties, bans) launches its forward before
the step in flight is fetched, and its outputs equal those of the synchronous engine
(`max_steps_in_flight` 0: every step processed before the next is built). Reuses
tests/test_structured_output.py's engine (no compile)."""
from __future__ import annotations

import json

import pytest
from _json_schemas import SCHEMAS
from jsonschema import Draft202012Validator
from test_structured_output import PROMPT, REGEXES, llm, model_dir  # noqa: F401 (fixtures)

from jaxpaged import SamplingParams, StructuredOutputsParams


EOS, MIN_TOKENS = 2, 6  # the tiny model's EOS id; the last row samples it as soon as min_tokens allows


def _params() -> list[SamplingParams]:
    """Grammar rows (seeded and greedy, with logprobs), and free rows with penalties, min_tokens,
    logit_bias: every history feature of the `full` head in one batch."""
    grammar = [SamplingParams(temperature=1.0, seed=i, max_tokens=60, logprobs=2,
                              structured_outputs=StructuredOutputsParams(json=s)) for i, s in enumerate(SCHEMAS[:6])]
    grammar += [SamplingParams(temperature=0, max_tokens=30, structured_outputs=StructuredOutputsParams(regex=r))
                for r in REGEXES[:3]]
    free = [SamplingParams(temperature=0.8, seed=3, max_tokens=24, presence_penalty=0.5, frequency_penalty=0.3),
            SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.3, min_tokens=20, logprobs=1),
            SamplingParams(temperature=0.9, seed=5, max_tokens=24, logit_bias={5: 3.0, 9: -100.0}),
            SamplingParams(temperature=0, max_tokens=24, min_tokens=MIN_TOKENS, logit_bias={EOS: 100.0})]
    return grammar + free


@pytest.fixture(scope="module")
def runs(llm, compile_counter):  # noqa: F811
    """The batch run async (recording launches and fetches) and synchronous; compiles caused."""
    core, runner = llm.engine.core, llm.engine.core.runner
    events, launch, fetch = [], runner.launch, runner.fetch

    def launch_recorded(sched, variant):
        launched = launch(sched, variant)
        grammar = any(r.request.structured_output is not None and r.num_sampled for r in sched.scheduled)
        events.append(("launch", id(launched), grammar))
        return launched

    def fetch_recorded(launched):
        events.append(("fetch", id(launched), None))
        return fetch(launched)

    compiles, params = compile_counter.count, _params()
    runner.launch, runner.fetch = launch_recorded, fetch_recorded
    try:
        async_outs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    finally:
        runner.launch, runner.fetch = launch, fetch
    depth, core._depth = core._depth, 0
    try:
        sync_outs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    finally:
        core._depth = depth
    return params, async_outs, sync_outs, events, compile_counter.count - compiles


def test_a_grammar_step_launches_before_the_step_in_flight_is_fetched(runs):
    """The host fills step n's successor's masks while the device runs: step n + 1 (with a
    grammar row) is launched before step n is fetched, at almost every decode step."""
    events = runs[3]
    unfetched, overlapped, grammar_launches = [], 0, 0
    for kind, step, grammar in events:
        if kind == "launch":
            grammar_launches += grammar
            overlapped += grammar and bool(unfetched)
            unfetched.append(step)
        else:
            unfetched.remove(step)
    assert grammar_launches >= 20 and overlapped >= grammar_launches - 2, (overlapped, grammar_launches)


def test_outputs_equal_the_synchronous_engine_and_follow_their_schemas(runs):
    params, async_outs, sync_outs, _, compiles = runs
    for p, a, s in zip(params, async_outs, sync_outs):
        a, s = a.outputs[0], s.outputs[0]
        assert a.token_ids == s.token_ids, p
        if p.logprobs:
            assert [sorted(d) for d in a.logprobs] == [sorted(d) for d in s.logprobs]
            assert [d[k].logprob for d in a.logprobs for k in sorted(d)] == \
                   pytest.approx([d[k].logprob for d in s.logprobs for k in sorted(d)], abs=1e-5)
        if p.structured_outputs is not None and p.structured_outputs.json is not None:
            assert a.finish_reason == "stop", a.text
            Draft202012Validator(p.structured_outputs.json).validate(json.loads(a.text))
    assert async_outs[-1].outputs[0].token_ids[MIN_TOKENS:] == [EOS], "min_tokens' ban not lifted at its count"
    assert compiles == 0, "late sampling inputs compiled a program"
