"""Request lifecycle through the engine: stops, EOS, min_tokens, n, abort, logprobs, deltas."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from jaxpaged import LLM, SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def llm(model_dir, compile_counter):
    # Same shapes as tests/test_engine.py's configs: the compiled steps are reused.
    llm = LLM(model_dir, max_model_len=128, block_size=4, num_kv_blocks=1024, max_num_seqs=64,
              max_num_batched_tokens=64)
    compiles = compile_counter.count
    yield llm
    # every request mix above (penalties, logprobs, bias, n, chunks) ran on warm-up's compiles
    assert compile_counter.count == compiles, "the engine compiled after warm-up"


def gen(llm, prompt, **kw):
    return llm.generate([prompt], SamplingParams(**kw), use_tqdm=False)[0]


def test_stop_string_across_tokens_is_cut(llm):
    prompt = "The quick brown fox"
    full = gen(llm, prompt, max_tokens=20, **GREEDY).outputs[0]
    tok = llm.get_tokenizer()
    pieces = [tok.decode(full.token_ids[:i]) for i in range(len(full.token_ids) + 1)]
    # a stop string that starts inside token 3's text and ends inside a later token's
    start = len(pieces[3]) - 1
    stop = full.text[start:start + 4]
    assert len(stop) == 4 and full.text.find(stop) == start
    out = gen(llm, prompt, max_tokens=20, stop=[stop], **GREEDY).outputs[0]
    assert out.text == full.text[:start]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    kept = gen(llm, prompt, max_tokens=20, stop=[stop], include_stop_str_in_output=True, **GREEDY)
    assert kept.outputs[0].text == full.text[:start + 4]


def test_stop_token_ids_eos_and_min_tokens(llm):
    full = gen(llm, "Hello", max_tokens=10, **GREEDY).outputs[0]
    out = gen(llm, "Hello", max_tokens=10, stop_token_ids=[full.token_ids[4]], **GREEDY).outputs[0]
    first = full.token_ids.index(full.token_ids[4])
    assert out.token_ids == full.token_ids[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", full.token_ids[4])

    eos = llm.engine.core.eos_token_ids[0]
    forced = dict(temperature=0, max_tokens=10, logit_bias={eos: 100.0})
    out = gen(llm, "Hello", **forced).outputs[0]
    assert out.token_ids == [eos] and (out.finish_reason, out.stop_reason) == ("stop", None)
    assert out.text == ""  # special tokens are skipped
    out = gen(llm, "Hello", min_tokens=5, **forced).outputs[0]
    assert out.token_ids[:5].count(eos) == 0 and out.token_ids[5:] == [eos]
    out = gen(llm, "Hello", ignore_eos=True, **forced).outputs[0]
    assert out.token_ids == [eos] * 10 and out.finish_reason == "length"


def hf_greedy_with_bans(hf, prompt, max_tokens, min_tokens, stop_token_ids, eos, ignore_eos=False, bias=None):
    """Greedy decoding on HF logits (float32) with vLLM's min_tokens rule: EOS and every stop
    token id get -inf for the first `min_tokens` steps; afterwards a stop id ends the output
    (kept, finish "stop") as does EOS unless ignore_eos. Returns (ids, finish_reason, stop_reason)."""
    ids = []
    for i in range(max_tokens):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + ids])).logits[0, -1].clone()
        for t, v in (bias or {}).items():
            logits[t] += v
        if i < min_tokens:
            logits[[eos, *stop_token_ids]] = -float("inf")
        tok = int(torch.argmax(logits))
        ids.append(tok)
        if i + 1 >= min_tokens and not ignore_eos and tok == eos:
            return ids, "stop", None
        if i + 1 >= min_tokens and tok in stop_token_ids:
            return ids, "stop", tok
    return ids, "length", None


def test_min_tokens_bans_eos_and_every_stop_token_id_like_hf(llm, model_dir):
    """Before min_tokens outputs, EOS and all stop_token_ids are banned (not just not
    stopping): the outputs are those of a greedy HF loop with those logits at -inf, for stop
    ids that greedy picks first without the ban; after min_tokens a stop id ends the output."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = llm.engine.core.eos_token_ids[0]
    prompt = np.random.default_rng(1).integers(3, 500, 11).tolist()
    free, _, _ = hf_greedy_with_bans(hf, prompt, 16, 0, [], eos, ignore_eos=True)
    early = [free[0], free[1]]  # what greedy picks first without a ban
    banned, _, _ = hf_greedy_with_bans(hf, prompt, 16, 4, early, eos, ignore_eos=True)
    late = next(t for t in banned[4:] if t not in banned[:4] + early)  # a stop id met after min_tokens
    stops = [*early, late]
    cases = [  # (min_tokens, stop_token_ids, logit_bias)
        (0, early, None),  # no ban: stops at once
        (4, [early[1], early[0]], None),  # the ban changes the first tokens: greedy would stop
        (4, stops, None),  # ... and stops at `late` after min_tokens
        (7, stops, None),
        (3, stops, {eos: 100.0}),  # EOS forced by the bias: banned for 3 steps, then it stops
    ]
    params = [SamplingParams(temperature=0, max_tokens=16, min_tokens=m, stop_token_ids=s, logit_bias=b)
              for m, s, b in cases]
    outs = llm.generate([prompt] * len(cases), params, use_tqdm=False)
    refs = [hf_greedy_with_bans(hf, prompt, 16, m, s, eos, bias=b) for m, s, b in cases]
    for out, ref, (m, s, b) in zip(outs, refs, cases):
        o = out.outputs[0]
        assert (o.token_ids, o.finish_reason, o.stop_reason) == ref, (m, s, b)
        assert not set(o.token_ids[:m]) & {eos, *s}
    assert refs[0] == ([early[0]], "stop", early[0])
    assert refs[1][0][:2] != early and len(refs[1][0]) > 4  # not stopped at once
    assert refs[2][1:] == ("stop", late) and len(refs[2][0]) > 4
    assert refs[4] == (refs[4][0][:3] + [eos], "stop", None)


def test_n_samples(llm):
    out = gen(llm, "Flat is better than nested.", n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    again = gen(llm, "Flat is better than nested.", n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    greedy = gen(llm, "Flat is better than nested.", n=2, max_tokens=8, **GREEDY)
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_abort_frees_blocks(llm):
    engine = llm.engine
    for i in range(5):
        engine.add_request(f"abort-{i}", list(range(10, 40)), SamplingParams(max_tokens=50, **GREEDY))
    engine.step()
    bm = engine.block_manager
    assert bm.num_free_blocks < bm.num_total_blocks
    assert engine.scheduler.waiting  # the budget left some requests queued: abort those too
    for i in range(5):
        engine.abort_request(f"abort-{i}")
    assert not engine.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_total_blocks
    assert engine.step() == []


def test_logprobs_match_hf(llm, model_dir):
    prompt = list(range(50, 70))
    out = gen(llm, prompt, max_tokens=6, logprobs=3, prompt_logprobs=2, **GREEDY)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = prompt + out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1).numpy()
    plain = gen(llm, prompt, max_tokens=6, **GREEDY).outputs[0]
    assert plain.token_ids == out.outputs[0].token_ids  # the full step variant samples the same
    comp = out.outputs[0]
    total = 0.0
    for j, (tid, lp) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[len(prompt) - 1 + j]
        assert len(lp) == 3 and lp[tid].rank == 1  # greedy: the chosen token is top-1
        for t, v in lp.items():
            np.testing.assert_allclose(v.logprob, row[t], atol=1e-4)
            assert v.rank == 1 + int((row > row[t] + 1e-6).sum())
        total += lp[tid].logprob
    np.testing.assert_allclose(comp.cumulative_logprob, total, rtol=1e-5)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for p in range(1, len(prompt)):
        entry = out.prompt_logprobs[p]
        np.testing.assert_allclose(entry[prompt[p]].logprob, ref[p - 1, prompt[p]], atol=1e-4)
        top2 = np.argsort(-ref[p - 1])[:2]
        assert set(top2) <= set(entry)


@pytest.mark.parametrize("sampled", [False, True])
def test_top_logprobs_alone_match_hf(llm, model_dir, monkeypatch, sampled):
    """Top-N logprobs without other history features run the logprobs heads (greedy_logprobs,
    sample_logprobs), not the full one: the raw log-softmax of each step's logits and the ranks,
    against HF on the generated sequence."""
    from jaxpaged.engine.sample.features import GREEDY_LOGPROBS, SAMPLE_LOGPROBS
    runner, used = llm.engine.runner, []
    launch = runner.launch
    monkeypatch.setattr(runner, "launch", lambda sched, variant: used.append(variant) or launch(sched, variant))
    prompt = list(range(30, 45))
    kw = dict(temperature=0.9, seed=7, ignore_eos=True) if sampled else GREEDY
    comp = gen(llm, prompt, max_tokens=6, logprobs=4, **kw).outputs[0]
    assert set(used) == {SAMPLE_LOGPROBS if sampled else GREEDY_LOGPROBS}
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + comp.token_ids])).logits[0], -1).numpy()
    for j, (tid, lp) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[len(prompt) - 1 + j]
        assert tid in lp and len(lp) in (4, 5)  # the top 4, and the sampled token if not among them
        for t, v in lp.items():
            np.testing.assert_allclose(v.logprob, row[t], atol=1e-4)
            assert v.rank == 1 + int((row > row[t] + 1e-6).sum())
        assert set(np.argsort(-row)[:4]) <= set(lp)


def test_streaming_deltas_concatenate_to_final_text(llm):
    engine = llm.engine
    tok = llm.get_tokenizer()
    prompt = tok.encode("Ünïcödé 日本語 🙂")
    p = dict(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True, stop=["e "])
    engine.add_request("delta", prompt, SamplingParams(output_kind="delta", **p))
    text, ids, final = "", [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            text += out.outputs[0].text
            ids += out.outputs[0].token_ids
            final = out
    ref = gen(llm, prompt, **p).outputs[0]
    assert final.finished and text == ref.text and ids == ref.token_ids
    assert "\ufffd" not in text or "\ufffd" in tok.decode(ids)


def test_too_long_request_is_rejected_with_numbers(llm):
    with pytest.raises(ValueError, match=r"maximum context length is 128 tokens.*130 tokens \(30 in the prompt"):
        llm.generate([list(range(30))], SamplingParams(max_tokens=100), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]], SamplingParams(), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("temperature", float("nan")), ("temperature", 1e39), ("repetition_penalty", 1e39),
    ("top_p", 0), ("top_k", -2), ("min_p", 1.5), ("n", 0), ("max_tokens", -1),
    ("presence_penalty", 3), ("repetition_penalty", 0), ("logprobs", 21), ("min_tokens", -1),
    ("allowed_token_ids", []), ("bad_words", [" "]), ("truncate_prompt_tokens", 0), ("truncate_prompt_tokens", -2),
])
def test_sampling_params_validation(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_max_tokens_0_computes_the_prompt_only(llm):
    """A prompt-only request (echo with max_tokens 0 on the server): its prompt logprobs, no
    token, finish "length", its blocks freed; beside requests that generate, chunked (30
    tokens, chunks of at most 64 - the others' tokens) and with n = 2."""
    engine = llm.engine
    prompts = [list(range(40, 70)), list(range(100, 105))]
    outs = llm.generate(prompts, [SamplingParams(max_tokens=0, prompt_logprobs=1, n=2),
                                  SamplingParams(max_tokens=6, **GREEDY)], use_tqdm=False)
    only, other = outs
    assert [(c.token_ids, c.finish_reason) for c in only.outputs] == [([], "length")] * 2
    assert len(only.prompt_logprobs) == 30 and only.prompt_logprobs[0] is None
    assert all(prompts[0][i] in e for i, e in enumerate(only.prompt_logprobs) if e is not None)
    assert other.outputs[0].token_ids == gen(llm, prompts[1], max_tokens=6, **GREEDY).outputs[0].token_ids
    assert not engine.has_unfinished_requests() and engine.block_manager.usage == 0


def test_n_samples_share_prompt_blocks(llm):
    engine, bm = llm.engine, llm.engine.block_manager
    prompt = list(range(200, 222))  # 22 tokens: 5 full blocks of 4 and a partial one
    engine.add_request("fork", prompt, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=30, ignore_eos=True))
    seqs = engine.core.requests["fork"]
    while not all(s.output_token_ids for s in seqs):
        engine.step()
    tables = [bm.block_table(s.seq_id) for s in seqs]
    assert tables[0][:5] == tables[1][:5] == tables[2][:5]  # the prompt's full blocks, shared
    assert len({t[5] for t in tables}) == 3  # each sample writes its own tail block
    engine.abort_request("fork")
    assert bm.num_free_blocks == bm.num_total_blocks



def test_runner_marks_short_query_steps(llm):
    """Steps above 32 tokens whose sequences all have <= 32 new tokens take the forward
    variant with the `max_query_len` hint (the kernel's decode launch); a long chunk does not."""
    import numpy as np

    from jaxpaged.engine.host_buffer import unpack
    from jaxpaged.kernels.attention_tiles import DECODE_ONLY_MAX_TOKENS

    runner = llm.engine.runner
    seen, dispatch = [], runner.dispatch

    def recording(mode, step, layout, max_query_len, *rest):
        fields = unpack(step, layout)
        seen.append((fields["token_ids"].shape[0], int(np.diff(np.asarray(fields["query_start"])).max()),
                     max_query_len))
        return dispatch(mode, step, layout, max_query_len, *rest)

    runner.dispatch = recording
    try:
        llm.generate([[5, 6, 7]] * 40 + [list(range(1, 51))], SamplingParams(temperature=0, max_tokens=3),
                     use_tqdm=False)
    finally:
        runner.dispatch = dispatch
    assert any(q == DECODE_ONLY_MAX_TOKENS for *_, q in seen), seen  # the 40-way decode steps (bucket 64)
    assert any(longest > DECODE_ONLY_MAX_TOKENS and q is None for _, longest, q in seen), seen  # the 50-token chunk
    for tokens, longest, q in seen:
        assert q == (DECODE_ONLY_MAX_TOKENS if tokens in runner.short_query_buckets and longest <= DECODE_ONLY_MAX_TOKENS else None)


def test_dispatch_overlaps_output_processing(llm):
    """The step's dispatch runs on the runner's worker thread, so the engine processes step n
    while step n+1 is dispatched: with a dispatch made slow on purpose, processing of the
    previous step starts before that dispatch returns, and the outputs do not change."""
    import threading
    import time

    runner, engine = llm.engine.runner, llm.engine
    params = SamplingParams(temperature=0, max_tokens=6)
    expected = [o.outputs[0].token_ids for o in llm.generate([[5, 6, 7], [8, 9]], params, use_tqdm=False)]
    events, dispatch, process = [], runner.dispatch, engine.core._process

    def slow_dispatch(*a):
        events.append(("dispatch start", threading.current_thread().name))
        time.sleep(0.05)
        out = dispatch(*a)
        events.append(("dispatch end", threading.current_thread().name))
        return out

    def traced_process(launched):
        events.append(("process", threading.current_thread().name))
        return process(launched)

    runner.dispatch, engine.core._process = slow_dispatch, traced_process
    try:
        got = [o.outputs[0].token_ids for o in llm.generate([[5, 6, 7], [8, 9]], params, use_tqdm=False)]
    finally:
        runner.dispatch, engine.core._process = dispatch, process
    assert got == expected
    main = threading.current_thread().name
    assert {name for kind, name in events if kind.startswith("dispatch")} == {"jaxpaged-dispatch_0"}
    assert all(name == main for kind, name in events if kind == "process")
    # some step's processing happened between a later step's dispatch start and its end
    order = [kind for kind, _ in events]
    assert any(order[i:i + 3] == ["dispatch start", "process", "dispatch end"] for i in range(len(order))), order


def test_step_variant_skips_unused_top_k_top_p(llm, monkeypatch):
    """Sampled steps where no request can be cut by top_k / top_p run the head variant without
    their bisections (SAMPLE), any such request takes SAMPLE_FILTERED, all-greedy steps
    GREEDY; a seeded request draws the same tokens whichever variant served it."""
    from jaxpaged.engine.sample.features import GREEDY, SAMPLE, SAMPLE_FILTERED

    runner = llm.engine.runner
    variants, dispatch = [], runner.dispatch

    def recording(variant, *args):
        variants.append(variant)
        return dispatch(variant, *args)

    monkeypatch.setattr(runner, "dispatch", recording)

    def run(*params: SamplingParams) -> tuple[list[list[int]], set]:
        variants.clear()
        outs = llm.generate(["Hello world"] * len(params), list(params), use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], set(variants)

    kw = dict(max_tokens=8, ignore_eos=True)
    greedy, used = run(SamplingParams(temperature=0, **kw))
    assert used == {GREEDY}
    plain = SamplingParams(temperature=1.0, seed=11, **kw)
    alone, used = run(plain)
    assert used == {SAMPLE}
    off = SamplingParams(temperature=0.8, top_k=runner.cfg.vocab_size, seed=1, **kw)  # cuts nothing
    greedy_filters = SamplingParams(temperature=0, top_k=3, top_p=0.5, **kw)  # greedy rows ignore them
    tokens, used = run(plain, off, greedy_filters)
    assert used == {SAMPLE} and tokens[0] == alone[0]
    tokens, used = run(plain, SamplingParams(temperature=1.0, top_p=0.5, seed=12, **kw))
    assert used == {SAMPLE_FILTERED} and tokens[0] == alone[0]
    tokens, used = run(plain, SamplingParams(temperature=1.0, top_k=1, seed=13, **kw))
    assert used == {SAMPLE_FILTERED} and tokens == [alone[0], greedy[0]]  # top_k=1 is argmax


def test_text_and_tokens_prompt_dicts_as_in_vllm(llm):
    """vLLM's TextPrompt and TokensPrompt dicts give the outputs of the plain text and ids;
    a dict with other keys is refused, naming them; a `cache_salt` keeps its prefix apart."""
    params = SamplingParams(max_tokens=6, **GREEDY)
    ids = llm.get_tokenizer().encode("Hello world")
    plain = [o.outputs[0].token_ids for o in llm.generate(["Hello world", ids], params, use_tqdm=False)]
    dicts = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt": "Hello world"}, {"prompt_token_ids": ids}], params, use_tqdm=False)]
    assert dicts == plain and plain[0] == plain[1]
    single = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)
    assert single[0].outputs[0].token_ids == plain[1]
    with pytest.raises(ValueError, match="multi_modal_data"):
        llm.generate({"prompt": "Hi", "multi_modal_data": {}}, params, use_tqdm=False)
    # cache_salt: the prefix cache serves a prompt only under the salt it was cached with
    long = [7] + ids * 12  # a first block no earlier prompt had

    def cached(**salt) -> int:
        out = llm.generate({"prompt_token_ids": long, **salt}, params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == first.outputs[0].token_ids
        return out.num_cached_tokens

    first = llm.generate({"prompt_token_ids": long, "cache_salt": "a"}, params, use_tqdm=False)[0]
    assert cached(cache_salt="b") == 0 and cached() == 0 and cached(cache_salt="a") > 0
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        llm.generate({"prompt": "Hi", "cache_salt": ""}, params, use_tqdm=False)
