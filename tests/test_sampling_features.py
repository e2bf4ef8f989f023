"""Sampling features: what each request needs, the compiled variant a batch runs, the token
bitmask input, and no compile after warm-up whichever variants and decode loops the engine runs."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jaxpaged import LLM, SamplingParams
from jaxpaged.engine.sample.features import (FULL, GREEDY, GREEDY_LOGPROBS, GREEDY_MASKED, LOOP_VARIANTS, SAMPLE,
                                             SAMPLE_FILTERED, SAMPLE_LOGPROBS, SAMPLE_MASKED, VARIANTS, SamplingFeatures,
                                             features_of, variant_for)
from jaxpaged.engine.sample.sampler import apply_token_bitmask, make_sampling_input, row_keys, sample

V = 50


@pytest.mark.parametrize("params,expected", [
    (dict(temperature=0), GREEDY),
    (dict(temperature=0, top_k=3, top_p=0.5), GREEDY),  # greedy rows ignore the filters
    (dict(temperature=0.7), SAMPLE),
    (dict(temperature=0.7, top_k=V), SAMPLE),  # top_k >= vocab cuts nothing
    (dict(temperature=0.7, top_k=5), SAMPLE_FILTERED),
    (dict(temperature=0.7, top_p=0.9), SAMPLE_FILTERED),
    (dict(temperature=0, presence_penalty=0.5), SamplingFeatures(penalties=True)),
    (dict(temperature=0, min_tokens=2), SamplingFeatures(logit_bias=True)),
    (dict(temperature=0, logit_bias={3: 1.0}), SamplingFeatures(logit_bias=True)),
    (dict(temperature=0, logprobs=0), GREEDY),  # the sampled token's logprob comes with every variant
    (dict(temperature=0, logprobs=2), SamplingFeatures(logprobs=True)),
    (dict(temperature=0, prompt_logprobs=0), SamplingFeatures(prompt_logprobs=True)),
    (dict(temperature=0, allowed_token_ids=[3, 4]), SamplingFeatures(token_bitmask=True)),
    (dict(temperature=0, bad_words_token_ids=[[3]]), SamplingFeatures(token_bitmask=True)),
])
def test_features_of_a_request(params, expected):
    assert features_of(SamplingParams(**params), V) == expected


def test_variant_is_the_cheapest_that_covers_the_batch():
    assert [variant_for(v) for v in VARIANTS] == list(VARIANTS)
    assert variant_for(SamplingFeatures(penalties=True)) == FULL
    assert variant_for(SAMPLE | SamplingFeatures(top_k_top_p=True)) == SAMPLE_FILTERED
    assert all(not v.needs_history and not v.logprobs for v in LOOP_VARIANTS) and FULL not in LOOP_VARIANTS
    assert not GREEDY_LOGPROBS.needs_history and not GREEDY_LOGPROBS.in_decode_loop  # not late, not looped
    assert variant_for(SamplingFeatures(token_bitmask=True)) == GREEDY_MASKED  # structured output, greedy
    assert variant_for(SamplingFeatures(random=True, token_bitmask=True)) == SAMPLE_MASKED
    assert variant_for(SamplingFeatures(logprobs=True)) == GREEDY_LOGPROBS  # top-N logprobs, greedy
    assert variant_for(SamplingFeatures(random=True, logprobs=True)) == SAMPLE_LOGPROBS
    assert variant_for(SamplingFeatures(token_bitmask=True, logprobs=True)) == FULL
    assert variant_for(SamplingFeatures(logprobs=True, prompt_logprobs=True)) == FULL


def test_token_bitmask_allows_only_its_tokens():
    """Bit v % 32 of word v // 32 allows token v (numpy oracle); greedy and sampled rows never
    pick a banned token, whatever the logits prefer."""
    rng = np.random.default_rng(0)
    s = 6
    logits = rng.normal(size=(s, V)).astype(np.float32)
    allowed = rng.random((s, V)) < 0.3
    allowed[:, 0] = True
    bits = np.zeros((s, -(-V // 32) * 32), np.uint32)
    bits[:, :V] = allowed
    words = (bits.reshape(s, -1, 32) << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32).view(np.int32)
    masked = np.asarray(apply_token_bitmask(logits, words))
    np.testing.assert_array_equal(masked, np.where(allowed, logits, -np.inf))
    params = [dict(temperature=0)] * 3 + [dict(temperature=1.0)] * 3
    fn = jax.jit(lambda lg, sp, m: sample(lg, sp, token_bitmask=m).token_ids)
    drawn = np.stack([fn(logits, make_sampling_input(params, row_keys(range(s), [i] * s)), words) for i in range(50)])
    assert all(allowed[r, t] for r in range(s) for t in drawn[:, r])
    np.testing.assert_array_equal(drawn[0, :3], np.where(allowed, logits, -np.inf)[:3].argmax(-1))


@pytest.mark.parametrize("num_scheduler_steps", [1, 3])
def test_no_compile_after_warmup_whatever_variant_runs(tiny_model_dir, compile_counter, num_scheduler_steps):
    """Batches that need each compiled variant (and, with multi-step decode, each decode loop)
    run on warm-up's programs: the compile counter does not move."""
    llm = LLM(tiny_model_dir("llama"), max_model_len=128, block_size=4, num_kv_blocks=1024, max_num_seqs=64,
              max_num_batched_tokens=64, num_scheduler_steps=num_scheduler_steps)
    runner = llm.engine.runner
    compiles = compile_counter.count
    used, dispatch, dispatch_loop, dispatch_late = [], runner.dispatch, runner.dispatch_loop, runner.dispatch_late
    runner.dispatch = lambda variant, *a: used.append((variant, False)) or dispatch(variant, *a)
    runner.dispatch_late = lambda variant, *a: used.append((variant, False)) or dispatch_late(variant, *a)
    runner.dispatch_loop = lambda variant, *a: used.append((variant, True)) or dispatch_loop(variant, *a)
    kw = dict(max_tokens=7, ignore_eos=True)
    batches = [[SamplingParams(temperature=0, **kw)],
               [SamplingParams(temperature=0.8, seed=1, **kw)],
               [SamplingParams(temperature=0.8, top_p=0.7, seed=2, **kw)],
               [SamplingParams(temperature=0, allowed_token_ids=[5, 9], **kw)],
               [SamplingParams(temperature=0.8, seed=4, allowed_token_ids=[5, 9], **kw)],
               [SamplingParams(temperature=0, logprobs=2, **kw)],
               [SamplingParams(temperature=0.8, seed=5, logprobs=1, **kw)],
               [SamplingParams(temperature=0, presence_penalty=0.5, **kw),
                SamplingParams(temperature=0, logprobs=2, prompt_logprobs=1, logit_bias={5: 2.0}, min_tokens=2, **kw),
                SamplingParams(temperature=0.8, seed=3, allowed_token_ids=[5, 9], bad_words=["a"], **kw)]]
    for params in batches:
        outs = llm.generate([[3, 4, 5, 6, 7]] * len(params), params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 7 for o in outs)
    assert set(outs[-1].outputs[0].token_ids) <= {5, 9}
    assert {v for v, _ in used} == set(VARIANTS)
    if num_scheduler_steps > 1:
        assert {v for v, loop in used if loop} == set(LOOP_VARIANTS)
    assert compile_counter.count == compiles, "the engine compiled after warm-up"


def test_variants_are_frozen_and_hashable():
    """Variants are static arguments of the jitted head: equal flags, equal programs."""
    assert hash(dataclasses.replace(SAMPLE)) == hash(SAMPLE) and dataclasses.replace(SAMPLE) == SAMPLE
    with pytest.raises(dataclasses.FrozenInstanceError):
        SAMPLE.random = False
