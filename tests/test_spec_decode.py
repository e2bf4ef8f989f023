"""Speculative decoding's parts: the config's keys, the n-gram proposer against a plain-python
prompt lookup (and vLLM's cases), and the rejection sampler against the exact target
distribution (chi-square over 40,000 draws in one jitted call) and a numpy reference; which
rows get drafts."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from jaxpaged.engine.request import Request
from jaxpaged.engine.sample.features import features_of
from jaxpaged.engine.sampling_params import SamplingParams
from jaxpaged.engine.spec_decode.config import DISABLE_BY_BATCH_SIZE, SpeculativeConfig
from jaxpaged.engine.spec_decode.ngram_proposer import NgramProposer, max_drafts
from jaxpaged.engine.spec_decode.rejection_sampler import rejection_sample_jit, rejection_sample_reference


def test_config_parses_vllm_keys_and_names_what_it_refuses():
    c = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (4, 4)
    assert SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2}).prompt_lookup_min == 5
    for bad, named in [({"method": "ngram", "num_speculative_tokens": 2, "eagle_depth": 3}, "eagle_depth"),
                       ({"method": "eagle3", "num_speculative_tokens": 2}, "eagle3"),
                       ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
                         "prompt_lookup_max": 2}, "prompt_lookup_min"),
                       ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
                       ({"method": "ngram"}, "num_speculative_tokens")]:
        with pytest.raises(ValueError, match=named):
            SpeculativeConfig.from_dict(bad)
    c = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 4})
    assert c.speculates(4) and not c.speculates(5)
    default = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2})
    assert default.speculates(DISABLE_BY_BATCH_SIZE) and not default.speculates(DISABLE_BY_BATCH_SIZE + 1)
    always = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2,
                                         "disable_by_batch_size": None})
    assert always.speculates(10**6)  # vLLM's null: at any batch size


def lookup(tokens: list[int], lo: int, hi: int, k: int) -> list[int]:
    """Prompt lookup written plainly: the longest suffix n-gram, its first earlier occurrence."""
    for n in range(hi, lo - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for i in range(len(tokens) - n):
            if tokens[i:i + n] == suffix:
                return tokens[i + n:i + n + k]
    return []


def test_ngram_proposer_matches_vllm_cases_and_a_plain_lookup():
    # vLLM's tests/v1/spec_decode/test_ngram.py cases
    assert NgramProposer(2, 2, 2).propose([1, 2, 3, 4, 1, 2, 3, 5, 6]) == []
    assert NgramProposer(2, 2, 3).propose([1, 2, 3, 4, 1, 2, 3]) == [4, 1, 2]
    assert NgramProposer(1, 1, 2).propose([1, 3, 6, 2, 3, 4, 1, 2, 3]) == [6, 2]  # the first match
    assert NgramProposer(3, 4, 2).propose([2, 3, 4, 5, 1, 2, 3, 4, 1, 2, 3, 4]) == [1, 2]  # the longest
    assert NgramProposer(2, 4, 2).propose([3, 4, 5, 2, 3, 4, 1, 2, 3, 4]) == [1, 2]
    assert NgramProposer(3, 3, 2).propose([1, 2, 3, 100, 1, 2, 3, 200, 1, 2, 3, 300, 1, 2, 3]) == [100, 1]
    assert NgramProposer(2, 2, 2).propose([]) == [] and NgramProposer(2, 2, 3).propose([1, 2, 1, 2], 1) == [1]
    rng = np.random.default_rng(0)
    found = 0
    for _ in range(300):
        tokens = rng.integers(0, 4, int(rng.integers(1, 30))).tolist()
        lo = int(rng.integers(1, 4))
        hi, k = lo + int(rng.integers(0, 3)), int(rng.integers(1, 5))
        assert NgramProposer(lo, hi, k).propose(tokens) == lookup(tokens, lo, hi, k)
        found += bool(lookup(tokens, lo, hi, k))
    assert 50 < found < 300


V, K, N = 6, 2, 40_000


def _pvalue(counts: np.ndarray, expected: np.ndarray) -> float:
    """Chi-square p-value, the cells expected fewer than 5 times pooled into one."""
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    return chisquare(counts, expected * counts.sum() / expected.sum()).pvalue


def _dist(rng, *shape):
    x = rng.random((*shape, V)) ** 3
    return x / x.sum(-1, keepdims=True)


def _categorical(rng, probs):
    """One draw per row of probs [N, V]."""
    return (probs.cumsum(-1) > rng.random((probs.shape[0], 1))).argmax(-1)


def _two_tokens(rng, p, q, with_q: bool):
    """The first two generated tokens under speculation with k = 2, for N rows at once, of a
    Markov target: `p[c]` is the target's next-token distribution after token c (c = V: the
    prompt), `q[c]` the draft's. A step after token c verifies d0 ~ q[c], d1 ~ q[d0] (when not
    `with_q`, n-gram-like fixed drafts, q one-hot: the target's argmax, then d0 + 1), with 0..2 drafts per row; a row that
    emitted one token gets its second from the next step."""
    def step(c, seed):
        d0 = _categorical(rng, q[c]) if with_q else p[c].argmax(-1)
        d1 = _categorical(rng, q[d0]) if with_q else (d0 + 1) % V
        target = np.stack([p[c], p[d0], p[d1]], 1).astype(np.float32)
        draft = np.stack([q[c], q[d0]], 1).astype(np.float32) if with_q else None
        keys = np.random.default_rng(seed).integers(0, 2**32, (N, 2), dtype=np.uint64).astype(np.uint32)
        out = rejection_sample_jit(target, np.stack([d0, d1], 1).astype(np.int32),
                                   rng.integers(0, K + 1, N).astype(np.int32), keys, draft)
        return np.asarray(out.token_ids), np.asarray(out.num_emitted)

    toks, emitted = step(np.full(N, V), 1)
    t0 = toks[:, 0]
    nxt, _ = step(t0, 2)
    return t0, np.where(emitted >= 2, toks[:, 1], nxt[:, 0]), emitted


@pytest.mark.parametrize("with_q", [True, False], ids=["draft-probs", "ngram-one-hot"])
def test_rejection_sampling_emits_the_target_distribution(with_q):
    rng = np.random.default_rng(7)
    p, q = _dist(rng, V + 1), _dist(rng, V + 1)
    t0, t1, emitted = _two_tokens(rng, p, q, with_q)
    joint = np.bincount(t0 * V + t1, minlength=V * V)
    expected = (p[V][:, None] * p[:V]).ravel() * N
    assert _pvalue(np.bincount(t0, minlength=V), p[V] * N) > 1e-3
    assert _pvalue(joint, expected) > 1e-3
    assert (emitted == 1).any() and (emitted == 3).any()  # rejections and full acceptance both happened
    # the test can fail: the draft's own distribution is far from the target's
    wrong = (q[V][:, None] * q[:V]).ravel()
    assert _pvalue(joint, wrong / wrong.sum() * N) < 1e-6


def test_greedy_is_the_one_hot_special_case_and_matches_the_reference():
    rng = np.random.default_rng(3)
    s = 64
    logits = rng.normal(size=(s, K + 1, V))
    target = np.eye(V)[logits.argmax(-1)].astype(np.float32)  # greedy rows: one-hot argmax
    drafts = np.where(rng.random((s, K)) < 0.5, logits[:, :K].argmax(-1), rng.integers(0, V, (s, K))).astype(np.int32)
    num = rng.integers(0, K + 1, s).astype(np.int32)
    out = rejection_sample_jit(target, drafts, num, np.zeros((s, 2), np.uint32))
    ref = rejection_sample_reference(target, drafts, num, rng)
    got = [row[:n].tolist() for row, n in zip(np.asarray(out.token_ids), np.asarray(out.num_emitted))]
    assert got == ref
    for row, n_acc, d, n in zip(got, np.asarray(out.num_accepted), drafts, num):
        assert row[:n_acc] == d[:n_acc].tolist() and len(row) == n_acc + 1  # accepted drafts first


def test_numpy_reference_emits_the_target_distribution():
    rng = np.random.default_rng(11)
    p, q = _dist(rng, 20_000, K + 1), _dist(rng, 20_000, K)
    drafts = np.stack([_categorical(rng, q[:, j]) for j in range(K)], 1)
    out = rejection_sample_reference(p, drafts, np.full(20_000, K), rng, q)
    # row targets differ: compare the first token's count with the sum of its rows' probabilities
    first = np.array([o[0] for o in out])
    assert _pvalue(np.bincount(first, minlength=V), p[:, 0].sum(0)) > 1e-3


def test_target_probs_are_what_the_sampler_draws_from():
    """The verify head's target per position: one-hot argmax (greedy), else the softmax of the
    tokens that min_p, then top_k, then top_p keep (vLLM's order), against numpy."""
    from jaxpaged.engine.sample.sampler import make_sampling_input
    from jaxpaged.engine.spec_decode.verify import target_probs

    rng = np.random.default_rng(5)
    rows = [dict(temperature=0.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.6),
            dict(temperature=0.9, top_k=8, top_p=0.8, min_p=0.05), dict(temperature=1.0)]
    logits = rng.normal(size=(len(rows), K + 1, 40)) * 3
    sp = make_sampling_input(rows, np.zeros((len(rows), 2), np.uint32))
    got = np.asarray(target_probs(logits.astype(np.float32), sp, True))
    for i, r in enumerate(rows):
        for j in range(K + 1):
            x = logits[i, j]
            if r["temperature"] == 0:
                want = np.eye(40)[x.argmax()]
            else:
                p = np.exp(x / r["temperature"] - (x / r["temperature"]).max())
                keep = p >= r.get("min_p", 0) * p.max()
                keep &= x >= np.sort(x)[-r.get("top_k", 40)]
                q = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
                better = np.array([q[q > q[t]].sum() for t in range(40)])  # mass of strictly better tokens
                keep &= better < r.get("top_p", 1.0)
                want = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
            np.testing.assert_allclose(got[i, j], want, atol=1e-5)


def test_synthetic_acceptance_accepts_at_the_given_rate():
    s = 20_000
    target = np.full((s, K + 1, V), 1 / V, np.float32)
    keys = np.random.default_rng(0).integers(0, 2**32, (s, 2), dtype=np.uint64).astype(np.uint32)
    out = rejection_sample_jit(target, np.zeros((s, K), np.int32), np.full(s, K, np.int32), keys,
                               synthetic_acceptance_rate=0.8)
    accepted = np.asarray(out.num_accepted)
    # P(accepted = 0, 1, 2) = 0.2, 0.8 * 0.2, 0.8^2
    assert _pvalue(np.bincount(accepted, minlength=3), np.array([0.2, 0.16, 0.64]) * s) > 1e-3


@pytest.mark.parametrize(("kw", "speculates"), [
    ({}, True), ({"logprobs": 5}, True), ({"logit_bias": {3: -2.0}}, True), ({"top_k": 3, "temperature": 1.0}, True),
    ({"presence_penalty": 0.5}, False), ({"allowed_token_ids": [1, 2]}, False), ({"prompt_logprobs": 1}, False)])
def test_which_rows_get_drafts(kw, speculates):
    """Rows whose sampling the verify head does get drafts; min_tokens' bans (EOS, stop ids)
    end at a position, so a row gets none until min_tokens is met."""
    params = SamplingParams(**{"temperature": 0.0, "max_tokens": 20} | kw)
    seq = Request("0", 0, [1, 2, 3], params, features_of(params, 512), 20, 0)
    seq.all_token_ids += [4, 5]
    seq.num_computed_tokens = seq.num_tokens - 1
    assert (max_drafts(seq, 3, 128) == 3) == speculates
    if speculates:
        banned = SamplingParams(**{"temperature": 0.0, "max_tokens": 20, "min_tokens": 3} | kw)
        seq.params, seq.features = banned, features_of(banned, 512)
        assert max_drafts(seq, 3, 128) == 0  # 2 tokens out of 3
        seq.all_token_ids.append(6)
        seq.num_computed_tokens += 1
        assert max_drafts(seq, 3, 128) == 3
