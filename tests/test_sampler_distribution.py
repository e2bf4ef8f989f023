"""The jitted sampler's draws against exact probabilities: for temperature, min_p, top_k,
top_p alone and all together, 20,000 draws each (one batch, one compile, a distinct key per
row) are histogrammed and compared by a chi-square test with the renormalised softmax
computed here in float64 in vLLM's order: temperature -> min_p -> top_k -> top_p."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy.stats import chisquare

from jaxpaged.engine.sample.sampler import make_sampling_input, row_keys, sample

V = 16
DRAWS = 20_000
P_MIN = 1e-3
# A 16-token distribution (sorted) whose cumulative sums and ratios to the top keep clear of
# the cuts below; each case puts it in its own token order.
PROBS = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.04, 0.03, 0.015, 0.01,
                  0.004, 0.003, 0.003, 0.002, 0.002, 0.001])
CASES = {
    # T^2 (temperature applied twice) would put 0.85 instead of 0.68 of the mass on the top two
    "temperature": dict(temperature=0.6),
    "min_p": dict(temperature=1.0, min_p=0.22),  # cut at 0.066: keeps 5 tokens, 0.06 the first out
    "top_k": dict(temperature=1.0, top_k=3),  # a 4th would carry 0.1 / 0.75 = 13 %
    # cumulative 0.3, 0.5, 0.65, 0.75: keeps 4 tokens; a 5th would carry 0.08 / 0.83 = 9.6 %
    "top_p": dict(temperature=1.0, top_p=0.7),
    # T 0.8, then min_p 0.03 (keeps 8 tokens: 0.015 the first out), top_k 7, then top_p 0.8 over
    # those 7 (cumulative 0.37, 0.60, 0.75, 0.85): keeps 4, a 5th would carry 7.7 %
    "combined": dict(temperature=0.8, min_p=0.03, top_k=7, top_p=0.8),
}


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def np_filtered_probs(logits, temperature=1.0, min_p=0.0, top_k=0, top_p=1.0):
    """Exact sampling distribution (float64), vLLM V1 order; asserts every cut has a margin."""
    probs = np_softmax(logits.astype(np.float64) / temperature)
    keep = np.ones(V, bool)
    if min_p > 0:
        ratio = probs / probs.max()
        assert np.abs(np.log(ratio / min_p)).min() > 0.05, "a token sits at the min_p cut"
        keep &= ratio >= min_p
    order = np.argsort(-probs, kind="stable")
    if 0 < top_k < V:
        assert probs[order[top_k - 1]] > probs[order[top_k]] * 1.05, "a tie at the top_k cut"
        keep[order[top_k:]] = False
    if top_p < 1:
        renorm = np.where(keep, probs, 0.0) / probs[keep].sum()
        better = np.cumsum(renorm[order]) - renorm[order]  # mass of the strictly better tokens
        assert np.abs(better - top_p).min() > 0.01, "a cumulative sum sits at the top_p cut"
        keep[order[better >= top_p]] = False
    out = np.where(keep, probs, 0.0)
    return out / out.sum()


@pytest.fixture(scope="module")
def draws():
    rng = np.random.default_rng(11)
    logits, params, rows = [], [], {}
    for name, p in CASES.items():
        row = np.log(rng.permutation(PROBS)) + rng.normal()  # any offset: softmax is shift-invariant
        rows[name] = row
        logits += [row] * DRAWS
        params += [p] * DRAWS
    n = len(params)
    keys = row_keys(range(7, 7 + n), [3] * n)  # a distinct key per row
    out = jax.jit(sample)(np.stack(logits).astype(np.float32), make_sampling_input(params, keys))
    tokens = np.asarray(out.token_ids).reshape(len(CASES), DRAWS)
    return {name: (rows[name], np.bincount(t, minlength=V)) for name, t in zip(CASES, tokens)}


@pytest.mark.parametrize("name", list(CASES))
def test_draws_follow_exact_filtered_softmax(draws, name):
    logits, counts = draws[name]
    probs = np_filtered_probs(logits, **CASES[name])
    zero = probs == 0
    assert counts[zero].sum() == 0, f"drew filtered-out tokens {np.flatnonzero(zero & (counts > 0))}"
    # bins expected below 5 draws are merged into one
    expected = probs[~zero] * DRAWS
    obs = counts[~zero]
    small = expected < 5
    if small.any():
        expected = np.append(expected[~small], expected[small].sum())
        obs = np.append(obs[~small], obs[small].sum())
    assert len(obs) >= 3
    p = chisquare(obs, expected).pvalue
    assert p >= P_MIN, (name, p, obs.tolist(), expected.round(1).tolist())


def test_cases_are_not_vacuous():
    """The mutations the chi-square test must catch move much of the mass: temperature
    applied twice, or a filter keeping one token more (the best one it cuts)."""
    row = np.log(np.random.default_rng(0).permutation(PROBS))
    for name, p in CASES.items():
        exact = np_filtered_probs(row, **p)
        if name == "temperature":
            other = np_softmax(row / p["temperature"] ** 2)
        else:
            full = np_softmax(row / p["temperature"])
            extra = np.argmax(np.where(exact > 0, -1.0, full))
            other = np.where((exact > 0) | (np.arange(V) == extra), full, 0.0)
            other /= other.sum()
        assert 0.5 * np.abs(exact - other).sum() > 0.04, name
