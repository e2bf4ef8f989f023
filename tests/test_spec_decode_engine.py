"""N-gram speculative decoding in the engine: greedy outputs token-identical to the engine
without speculation (itself checked against HF in test_engine.py), with the same top-N
logprobs, under batch sizes,
preemption, stops and the batch-size cut-off; drafts both accepted and rejected (counters);
every block freed after rejections and aborts; nothing compiled after warm-up."""
from __future__ import annotations

import threading

import jax
import numpy as np
import pytest

from jaxpaged import LLM, SamplingParams
from jaxpaged.engine.messages import EngineCoreOutputs, decode, outputs_from_message, outputs_message
from jaxpaged.serve.metrics import Metrics

KW = {"max_model_len": 128, "block_size": 4, "num_kv_blocks": 1024, "max_num_seqs": 64, "max_num_batched_tokens": 64}
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 3}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def workload(model_dir):
    """Prompts that repeat a pattern (drafts found, often accepted: the tiny model repeats too)
    and random ones; greedy rows of varied lengths, one with a stop token and one with a stop
    string met mid-output, one with top-5 logprobs, one with n = 2, a seeded top-k / top-p row (its
    draws differ with speculation), a seeded row with a penalty (never speculates: outside the
    verify head's sampling, so its draws are the same), and the outputs of the engine without
    speculation."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 500, 5).tolist() * 4 + rng.integers(0, 500, 3).tolist() for _ in range(8)]
    prompts += [rng.integers(0, 500, int(rng.integers(5, 30))).tolist() for _ in range(4)]
    params = [SamplingParams(temperature=0, max_tokens=int(rng.integers(1, 40)), ignore_eos=True) for _ in prompts]
    params[5] = params[6] = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)  # changed below
    # (a short penalty row: while it runs no step speculates)
    params[-1] = SamplingParams(temperature=0.8, presence_penalty=0.5, seed=3, max_tokens=4, ignore_eos=True)
    params[4] = SamplingParams(temperature=0.3, top_p=0.9, top_k=5, seed=4, max_tokens=30, ignore_eos=True)
    params[2] = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=5)  # the top 5 and the chosen
    params[3] = SamplingParams(n=2, temperature=0, max_tokens=25, ignore_eos=True)  # samples fork the prompt
    base = LLM(model_dir, **KW)
    outs = base.generate(prompts, params, use_tqdm=False)
    # a stop token and a stop string, each met in the middle of an output
    toks = outs[0].outputs[0].token_ids
    params[0] = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=[toks[len(toks) // 2]])
    params[1] = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[outs[1].outputs[0].text[6:9]])
    # a logit bias against a token of the output, and a stop token that min_tokens bans for 8 tokens
    unbiased, unbanned = outs[5].outputs[0].token_ids, outs[6].outputs[0].token_ids
    params[5] = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logit_bias={unbiased[5]: -5.0})
    params[6] = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, min_tokens=8, stop_token_ids=[unbanned[1]])
    outs = base.generate(prompts, params, use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == outs[1].outputs[0].finish_reason == "stop"
    assert outs[5].outputs[0].token_ids != unbiased and outs[6].outputs[0].token_ids[:8] != unbanned[:8]
    return prompts, params, outs


def _logprobs(out) -> list[list[tuple[int, float, int]]]:
    """Each position's (token id, logprob, rank): the chosen token's, then the top N."""
    return [[(t, lp.logprob, lp.rank) for t, lp in entry.items()] for entry in out.outputs[0].logprobs]


def _same_logprobs(got, want) -> None:
    assert [[(t, r) for t, _, r in pos] for pos in got] == [[(t, r) for t, _, r in pos] for pos in want]
    assert [lp for pos in got for _, lp, _ in pos] == pytest.approx([lp for pos in want for _, lp, _ in pos],
                                                                    abs=1e-4)


CONFIGS = {
    "seqs64": {},
    "seqs1": {"max_num_seqs": 1},
    "preempt": {"num_kv_blocks": 40},
    "off-above-batch-4": {"speculative_config": {**SPEC, "disable_by_batch_size": 4}},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_outputs_match_the_engine_without_speculation(name, model_dir, workload, compile_counter):
    prompts, params, base = workload
    llm = LLM(model_dir, **{**KW, "speculative_config": SPEC, **CONFIGS[name]})
    compiles = compile_counter.count
    verified = []  # per step: (rows with drafts, rows, a top-k / top-p row had drafts)
    top_n, biased = [], []  # (drafts, accepted) of each verified row with top-N logprobs, with a logit bias
    launch, fetch = llm.engine.runner.launch, llm.engine.runner.fetch
    llm.engine.runner.launch = lambda sched, variant: verified.append(
        (sum(bool(r.draft_token_ids) for r in sched.scheduled), len(sched.scheduled),
         any(r.draft_token_ids and r.request.params.top_p < 1 for r in sched.scheduled))) or launch(sched, variant)

    def fetch_drafted(launched):
        out = fetch(launched)
        for i, r in enumerate(out.rows):
            if r.draft_token_ids:
                p, result = r.request.params, (len(r.draft_token_ids), int(out.num_emitted[i]) - 1)
                (top_n if p.logprobs else biased if p.logit_bias else []).append(result)
        return out
    llm.engine.runner.fetch = fetch_drafted
    outs = llm.generate(prompts, params, use_tqdm=False)
    same = [i for i in range(len(prompts)) if i != 4]  # all but the sampled row that speculates
    assert [[(c.token_ids, c.text, c.finish_reason) for c in outs[i].outputs] for i in same] == \
        [[(c.token_ids, c.text, c.finish_reason) for c in base[i].outputs] for i in same]
    assert len(outs[4].outputs[0].token_ids) == 30
    _same_logprobs(_logprobs(outs[2]), _logprobs(base[2]))  # of the verified positions
    assert len(_logprobs(outs[2])[0]) >= 5
    assert (top_n and biased) or name.startswith("off-above")  # the top-N and the biased rows had drafts
    stats = llm.engine.core.stats()
    assert 0 < stats.spec_decode_num_accepted_tokens < stats.spec_decode_num_draft_tokens  # accepted and rejected
    assert stats.spec_decode_num_accepted_tokens == sum(stats.spec_decode_num_accepted_tokens_per_pos)
    assert stats.spec_decode_num_accepted_tokens_per_pos[0] >= stats.spec_decode_num_accepted_tokens_per_pos[-1]
    if name in ("seqs64", "preempt"):  # rows with and without drafts in one step
        assert any(0 < spec < rows for spec, rows, _ in verified)
        assert any(top_p for _, _, top_p in verified)  # the top-k / top-p row was verified too
    if name == "seqs64":  # the top-N logprobs row's drafts both accepted and rejected
        assert any(0 < a for _, a in top_n) and any(a < d for d, a in top_n)
    if name == "preempt":
        assert llm.engine.scheduler.num_preemptions > 0
    if name.startswith("off-above"):  # more than 4 running: no drafts
        assert all(spec == 0 for spec, rows, _ in verified if rows > 4) and any(spec for spec, _, _ in verified)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks  # nothing leaked
    assert compile_counter.count == compiles, "the engine compiled after warm-up"


def test_aborts_after_rejections_free_every_block(model_dir, workload):
    prompts, _, _ = workload
    aborts_after_rejections_free_every_block(LLM(model_dir, **KW, speculative_config=SPEC, enable_prefix_caching=False),
                                             prompts)


def aborts_after_rejections_free_every_block(llm, prompts) -> None:
    """Abort 6 speculating requests once drafts were rejected: every block is free after."""
    engine = llm.engine
    for i, p in enumerate(prompts[:6]):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    while engine.core.spec_stats.num_draft_tokens - engine.core.spec_stats.num_accepted_tokens < 4:
        engine.step()
    for i in range(6):
        engine.abort_request(str(i))
    while engine.has_unfinished_requests():
        engine.step()
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks


def test_synthetic_acceptance_and_the_metrics_under_vllms_names(model_dir):
    """Benchmark mode: k drafts for every decode (this prompt has no repeated n-gram), each
    accepted at rate 1 whatever its value; the counters reach /metrics (through the core's
    wire message) under vLLM's names."""
    llm = LLM(model_dir, **KW, speculative_config={**SPEC, "synthetic_acceptance_rate": 1.0})
    runner, threads = llm.engine.runner, []
    verify = runner.dispatch_verify
    runner.dispatch_verify = lambda *a: threads.append(threading.current_thread()) or verify(*a)
    prompt = list(range(10, 40))
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    # the engine waits for a speculative step: dispatched on its own thread, no hand-over to the worker
    assert len(threads) == 10 and set(threads) == {threading.main_thread()}
    stats = llm.engine.core.stats()
    assert len(out[0].outputs[0].token_ids) == 40
    # 39 tokens after the first: 9 steps of 3 drafts + 1 bonus, then 2 drafts + 1 bonus (max_tokens)
    assert (stats.spec_decode_num_drafts, stats.spec_decode_num_draft_tokens) == (10, 29)
    assert stats.spec_decode_num_accepted_tokens == 29
    wire = outputs_from_message(decode(outputs_message(EngineCoreOutputs([], stats)))).stats
    text = Metrics("tiny", lambda: wire).render().decode()
    label = 'model_name="tiny"'
    for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        assert f"vllm:spec_decode_{name}_total{{{label}}} {float(getattr(stats, 'spec_decode_' + name))}" in text
    assert f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{{label},position="2"}} ' \
        f"{float(stats.spec_decode_num_accepted_tokens_per_pos[2])}" in text


@pytest.fixture(scope="module")
def tp_workload(tiny_model_dir):
    """test_tensor_parallel.py's model and engine shapes, prompts that repeat (n-gram matches)
    and their greedy outputs on one device without speculation."""
    from test_tensor_parallel import ENGINE

    model = tiny_model_dir("llama-tp")
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 500, 4).tolist() * 4 for _ in range(6)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(model, **ENGINE).generate(prompts, params, use_tqdm=False)]
    return model, ENGINE, prompts, params, want


def test_tensor_parallel_verifies_on_the_mesh(tp_workload):
    """tp = 2 on fake CPU devices: greedy outputs with n-gram speculation are those of one
    device without it."""
    model, engine, prompts, params, want = tp_workload
    llm = LLM(model, **engine, tensor_parallel_size=2, speculative_config=SPEC)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    assert llm.engine.core.spec_stats.num_accepted_tokens > 0


def test_tensor_parallel_drafts_on_the_mesh(tp_workload, tmp_path):
    """tp = 2: the draft model and its KV pool sharded as the target's; greedy outputs with its
    drafts (a noisy copy of the target: accepted and rejected) are one device's without."""
    from test_spec_decode_draft import _noisy_copy, _spec

    model, engine, prompts, params, want = tp_workload
    llm = LLM(model, **engine, tensor_parallel_size=2, speculative_config=_spec(_noisy_copy(model, tmp_path, 0.3)))
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    stats, drafter = llm.engine.core.stats(), llm.engine.core.drafter
    assert 0 < stats.spec_decode_num_accepted_tokens < stats.spec_decode_num_draft_tokens
    assert len(drafter.kv.k.sharding.device_set) == 2 and drafter.kv.k.sharding.spec == drafter.kv_sharding.spec
    assert len(jax.tree.leaves(drafter.params)[0].sharding.device_set) == 2
