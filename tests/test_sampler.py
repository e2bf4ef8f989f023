"""Sampler tests against an independent numpy oracle. Eight compiles in total:
`sample` at [S, V] = [2000, 16] with K = 3 logprobs, with and without top-k / top-p filters,
`apply_penalties` and `sample` with history at [4, 16], the top-k / top-p threshold with its
sort-based oracle at [512, 1000], and the `full` head's prompt logprobs at [20, 300] in two
chunk sizes and at [2048, 4000] (compiled only, for its memory); plus lowerings to StableHLO,
which compile nothing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.engine.sample.sampler import apply_penalties, make_history, make_sampling_input, row_keys, sample
from jaxpaged.engine.sample.topk_topp import BISECT_STEPS, top_k_top_p_threshold

S, V, K = 2000, 16, 3
_sample = jax.jit(sample, static_argnames=("num_logprobs", "greedy_only", "filters"))
_penalties = jax.jit(apply_penalties)

# A fixed 16-token distribution with well-separated cumulative sums (top_p margins >= 0.05).
PROBS = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.04, 0.03, 0.02, 0.01] + [0.01 / 6] * 6)
# (params, rows) groups of the filtering batch; each group shares one logits row.
GROUPS = [
    (dict(temperature=1.0, top_k=3), 250),
    (dict(temperature=1.0, top_p=0.7), 250),
    (dict(temperature=1.0, min_p=0.12), 250),
    (dict(temperature=0.7, top_k=6, top_p=0.8, min_p=0.05), 250),
]


def run(logits: np.ndarray, params: list[dict], keys: list[np.ndarray], filters: bool = True):
    out = _sample(logits.astype(np.float32), make_sampling_input(params, keys, S), num_logprobs=K, filters=filters)
    return jax.tree.map(np.asarray, out)


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_allowed(logits: np.ndarray, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> set[int]:
    """Tokens a sampled row may emit: min_p, then top_k, then the smallest top_p set."""
    probs = np_softmax(logits.astype(np.float64) / temperature)
    allowed = probs >= min_p * probs.max()
    order = np.argsort(-probs)
    if 0 < top_k < len(probs):
        allowed[order[top_k:]] = False
    if top_p >= 1.0:
        return set(np.flatnonzero(allowed).tolist())
    renorm = np.where(allowed, probs, 0.0) / probs[allowed].sum()
    kept, mass = set(), 0.0
    for tok in order:
        if allowed[tok]:
            kept.add(int(tok))
            mass += renorm[tok]
            assert abs(mass - top_p) > 1e-3, "test top_p too close to a cumulative sum"
            if mass >= top_p:
                break
    return kept


@pytest.fixture(scope="module")
def filter_inputs():
    """(logits, params, keys): groups above, then 100 greedy rows (random logits, filters set
    but ignored), then 900 rows at temperature 0.5 with one shared logits row (frequency check)."""
    rng = np.random.default_rng(0)
    logits, params = [], []
    for p, n in GROUPS:
        logits += [np.log(rng.permutation(PROBS))] * n
        params += [p] * n
    logits += list(rng.normal(size=(100, V)))
    params += [dict(temperature=0.0, top_k=2, top_p=0.5, min_p=0.3)] * 100
    free = rng.normal(scale=0.5, size=V)
    logits += [free] * 900
    params += [dict(temperature=0.5)] * 900
    logits = np.stack(logits)
    return logits, params, row_keys(range(S), [0] * S)


@pytest.fixture(scope="module")
def filter_batch(filter_inputs):
    logits, params, keys = filter_inputs
    return logits, params, run(logits, params, keys)


def test_filters_stay_in_allowed_set(filter_batch):
    logits, params, out = filter_batch
    start = 0
    for p, n in GROUPS:
        allowed = np_allowed(logits[start], **p)
        emitted = set(out.token_ids[start : start + n].tolist())
        assert len(allowed) > 1
        # every allowed token has renormalised probability >= 3 %, so 250 draws see them all
        assert emitted == allowed, (p, emitted, allowed)
        start += n


def test_unfiltered_sample_applies_temperature_and_min_p(filter_inputs, filter_batch):
    """filters=False: top_k / top_p are not traced (ignored), min_p and temperature still
    apply, and rows without top_k / top_p draw what the filtered sampler draws (same keys)."""
    logits, params, keys = filter_inputs
    out = run(logits, params, keys, filters=False)
    start = 0
    for p, n in GROUPS:
        unfiltered = np_allowed(logits[start], **{k: v for k, v in p.items() if k not in ("top_k", "top_p")})
        emitted = set(out.token_ids[start : start + n].tolist())
        assert emitted <= unfiltered, (p, emitted, unfiltered)
        if "top_k" in p or "top_p" in p:
            assert not emitted <= np_allowed(logits[start], **p), p  # the filters were skipped
        else:
            assert emitted == unfiltered, (p, emitted, unfiltered)
        start += n
    np.testing.assert_array_equal(out.token_ids[start:], filter_batch[2].token_ids[start:])


def test_greedy_is_argmax(filter_batch):
    logits, _, out = filter_batch
    np.testing.assert_array_equal(out.token_ids[1000:1100], logits[1000:1100].argmax(-1))


def test_frequencies_match_softmax(filter_batch):
    logits, _, out = filter_batch
    counts = np.bincount(out.token_ids[1100:], minlength=V)

    def chi2(probs):
        expected = probs * counts.sum()
        return ((counts - expected) ** 2 / expected).sum()

    assert chi2(np_softmax(logits[1100] / 0.5)) < 40.0  # df = 15: p ~ 5e-4
    assert chi2(np_softmax(logits[1100])) > 100.0  # ignoring temperature would be caught


def test_raw_logprobs_ranks_and_top_k(filter_batch):
    logits, _, out = filter_batch
    raw = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    rows = np.arange(S)
    np.testing.assert_allclose(out.logprobs, raw[rows, out.token_ids], atol=1e-5)
    order = np.argsort(-raw, axis=-1, kind="stable")
    ranks = np.argmax(order == out.token_ids[:, None], axis=-1) + 1
    np.testing.assert_array_equal(out.ranks, ranks)
    assert out.ranks.max() > 1
    np.testing.assert_array_equal(out.top_ids, order[:, :K])
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(raw, order[:, :K], -1), atol=1e-5)


def test_seed_and_step_determinism():
    rng = np.random.default_rng(1)
    logits = np.tile(rng.normal(scale=0.3, size=V), (S, 1))
    base = [(dict(temperature=1.0), seed, 5) for seed in range(S)]
    a = run(logits, [p for p, _, _ in base], row_keys(*zip(*[(s, t) for _, s, t in base]))).token_ids
    assert len(set(a.tolist())) > V // 2  # different seeds draw different tokens
    other_step = run(logits, [p for p, _, _ in base], row_keys([s for _, s, _ in base], [6] * len(base))).token_ids
    assert (other_step != a).mean() > 0.5
    # Same requests at other positions, among other requests, in a partly padded batch.
    perm = rng.permutation(S)[:1200]
    filler = [(dict(temperature=0.8, top_k=4), 10_000 + i, 0) for i in range(300)]
    mixed = [base[i] for i in perm[:600]] + filler + [base[i] for i in perm[600:]]
    b = run(logits, [p for p, _, _ in mixed], row_keys(*zip(*[(s, t) for _, s, t in mixed]))).token_ids
    np.testing.assert_array_equal(b[:600], a[perm[:600]])
    np.testing.assert_array_equal(b[900:1500], a[perm[600:]])
    np.testing.assert_array_equal(b[1500:], logits[0].argmax())  # padding rows are greedy


def test_row_keys_host_helper():
    seeds, steps = [seed for seed in range(50) for _ in range(50)], list(range(50)) * 50
    keys = row_keys(seeds, steps)
    assert keys.dtype == np.uint32 and keys.shape == (2500, 2)
    np.testing.assert_array_equal(keys, row_keys(seeds, steps))
    np.testing.assert_array_equal(keys[3 * 50], row_keys([3], [0])[0])  # a row's key is its own, in any batch
    assert len({k.tobytes() for k in keys}) == 2500


def np_penalties(logits, prompt, output, rep, freq, pres):
    out = logits.astype(np.float64).copy()
    for tok in set(prompt) | set(output):
        out[tok] = out[tok] / rep if out[tok] > 0 else out[tok] * rep
    for tok in set(output):
        n = output.count(tok)
        out[tok] -= freq * n + pres
    return out


PEN_SEQS = [([1, 2, 2, 3], [3, 3, 5, 1]), ([], [7, 7, 7]), ([4, 9, 4, 0, 15], []), ([], [])]
PEN_PARAMS = [
    dict(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.5),
    dict(temperature=0.0, repetition_penalty=0.8, frequency_penalty=0.0, presence_penalty=1.5),
    dict(temperature=1.0, top_k=1, repetition_penalty=2.0, frequency_penalty=1.0),
    dict(temperature=0.0, repetition_penalty=1.5, frequency_penalty=1.0, presence_penalty=1.0),
]


@pytest.fixture(scope="module")
def pen_case():
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=2.0, size=(4, V)).astype(np.float32)
    for row, (prompt, output) in enumerate(PEN_SEQS):
        if prompt or output:  # make the raw argmax a penalised token
            fresh = np.setdiff1d(np.arange(V), prompt + output)
            logits[row, (output or prompt)[0]] = logits[row, fresh].max() + 0.3
    sp = make_sampling_input(PEN_PARAMS, row_keys(range(4), [0] * 4))
    history, is_output = make_history(PEN_SEQS, length=12)
    expected = np.stack([
        np_penalties(logits[i], list(pr), list(out), PEN_PARAMS[i].get("repetition_penalty", 1.0),
                     PEN_PARAMS[i].get("frequency_penalty", 0.0), PEN_PARAMS[i].get("presence_penalty", 0.0))
        for i, (pr, out) in enumerate(PEN_SEQS)
    ])
    return logits, sp, history, is_output, expected


def test_make_history():
    history, is_output = make_history(PEN_SEQS, num_seqs=5, length=12)
    assert history.shape == (5, 12) and history.dtype == np.int32
    np.testing.assert_array_equal(history[0, :9], [1, 2, 2, 3, 3, 3, 5, 1, -1])
    np.testing.assert_array_equal(is_output[0, :9], [0, 0, 0, 0, 1, 1, 1, 1, 0])
    assert (history[3:] == -1).all() and not is_output[3:].any()


def test_apply_penalties_matches_numpy(pen_case):
    logits, sp, history, is_output, expected = pen_case
    got = np.asarray(_penalties(logits, sp, history, is_output))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[3], logits[3])  # empty history: unchanged
    assert not np.allclose(got[:3], logits[:3])


def test_sample_applies_penalties_raw_logprobs(pen_case):
    logits, sp, history, is_output, expected = pen_case
    out = jax.tree.map(np.asarray, _sample(logits, sp, history, is_output))
    assert out.top_ids is None and out.top_logprobs is None
    np.testing.assert_array_equal(out.token_ids, expected.argmax(-1))
    assert (out.token_ids[:3] != logits[:3].argmax(-1)).all()  # penalties changed the choice
    raw = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(out.logprobs, raw[np.arange(4), out.token_ids], atol=1e-5)
    np.testing.assert_array_equal(out.ranks[:3], (raw[:3] >= raw[np.arange(3), out.token_ids[:3], None]).sum(-1))


# ---------------------------------------------------------------- top-k / top-p threshold


def sort_threshold(x: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Oracle: the sampler's former sort + cumsum version (vLLM's). Same contract as
    `top_k_top_p_threshold`: x [S, V], top_k [S] in [1, V], top_p [S] -> [S, 1]."""
    v = x.shape[-1]
    desc = jnp.sort(x, axis=-1)[:, ::-1]
    pos = jnp.arange(v)[None, :]
    in_k = pos < top_k[:, None]
    probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly better tokens
    p = top_p[:, None]
    keep = in_k & ((before < p) | (p >= 1.0) | (pos == 0))  # a prefix of `desc`
    return jnp.take_along_axis(desc, keep.sum(-1, keepdims=True) - 1, axis=-1)


def test_threshold_matches_sort_oracle():
    rng = np.random.default_rng(3)
    s, v = 512, 1000
    x = rng.normal(size=(s, v)) * rng.uniform(0.3, 6.0, (s, 1))
    x[::2] = np.round(x[::2] * rng.integers(1, 4, (s // 2, 1)))  # many ties, also at the cuts
    min_p = np.where(rng.random(s) < 0.5, rng.uniform(0.0, 0.5, s), 0.0)
    with np.errstate(divide="ignore"):
        x = np.where(x >= x.max(-1, keepdims=True) + np.log(min_p)[:, None], x, -np.inf).astype(np.float32)
    x[:4] = -np.inf
    x[:4, 7] = 1.5  # a single finite token
    top_k = np.select([rng.random(s) < 0.25, rng.random(s) < 0.5], [v, rng.integers(1, v + 1, s)],
                      rng.integers(1, 40, s)).astype(np.int32)
    top_p = np.where(rng.random(s) < 0.25, 1.0, rng.uniform(0.0, 1.0, s)).astype(np.float32)
    new, old = jax.jit(lambda *a: (top_k_top_p_threshold(*a), sort_threshold(*a)))(x, top_k, top_p)
    new, old = np.asarray(new), np.asarray(old)
    assert ((x == new) | (new == -np.inf)).any(-1).all()  # an actual logit of the row

    # Rows where a float64 cumulative sum over the top k lies within 1e-5 of p may cut differently.
    desc = -np.sort(-x.astype(np.float64), axis=-1)
    probs = np.exp(desc - desc[:, :1]) * (np.arange(v) < top_k[:, None])
    cums = np.cumsum(probs / probs.sum(-1, keepdims=True), axis=-1)
    near = (np.abs(cums - top_p[:, None].astype(np.float64)) < 1e-5).any(-1) & (top_p < 1.0)
    assert near.sum() < s // 20
    kept_new, kept_old = x >= new, x >= old
    differ = (kept_new != kept_old).any(-1)
    assert not (differ & ~near).any(), np.flatnonzero(differ & ~near)
    # The filters do cut: top_k alone, then top_p below that, on many rows.
    n_kept, n_k = kept_new.sum(-1), (x >= -np.sort(-x, -1)[np.arange(s), top_k - 1, None]).sum(-1)
    assert ((n_kept < n_k) & (n_kept > 1)).sum() > s // 4
    assert ((n_k < (x > -np.inf).sum(-1)) & (n_k > 1)).sum() > s // 4
    assert (n_k > top_k).sum() > 10  # ties at the top_k cut, all kept


def lowered(*args, **static) -> str:
    """StableHLO of `sample` lowered for CUDA (nothing is compiled): the CPU lowering of
    threefry is a rolled loop."""
    return _sample.trace(*args, num_logprobs=2, **static).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("static", [{}, {"filters": False}, {"greedy_only": True}],
                         ids=["sample", "unfiltered", "greedy_only"])
def test_sample_lowers_without_conditionals(pen_case, static):
    """On GPU a conditional's predicate is read on the host (no host / device overlap)."""
    logits, sp, history, is_output, _ = pen_case
    for args in [(logits, sp), (logits, sp, history, is_output)]:
        text = lowered(*args, **static)
        for op in ("stablehlo.case", "stablehlo.if", "stablehlo.while"):
            assert op not in text, op


def test_unfiltered_sample_lowers_without_bisections(pen_case):
    """filters=False drops the top-k / top-p threshold: a reduction per bisection step."""
    logits, sp, *_ = pen_case

    def reductions(**static) -> int:
        return lowered(logits, sp, **static).count("stablehlo.reduce(")

    assert reductions() - reductions(filters=False) >= 2 * BISECT_STEPS


@pytest.mark.parametrize("rows", [8, 64])
def test_prompt_logprobs_by_chunks_match_numpy(monkeypatch, rows):
    """The `full` head's prompt logprobs, `rows` rows of f32 logits at a time (8: three chunks,
    the last padded; 64: one), against numpy's log-softmax over the whole [T, V]."""
    from jaxpaged.engine import step_programs

    monkeypatch.setattr(step_programs, "PROMPT_LOGPROBS_ROWS", rows)
    rng = np.random.default_rng(5)
    t, h, v = 20, 16, 300
    hidden, w = rng.standard_normal((t, h), np.float32), rng.standard_normal((h, v), np.float32)
    nxt = rng.integers(-1, v, t)
    out = jax.jit(lambda x, n: step_programs._prompt_logprobs(lambda y: y @ w, x, n))(hidden, nxt)
    logits = hidden.astype(np.float64) @ w
    ref = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    lp = ref[np.arange(t), np.maximum(nxt, 0)]
    np.testing.assert_allclose(out.logprobs, lp, atol=1e-4)
    np.testing.assert_array_equal(out.ranks, (ref >= lp[:, None] - 1e-9).sum(-1))
    top = np.argsort(-ref, -1)[:, :out.top_ids.shape[1]]
    np.testing.assert_array_equal(out.top_ids, top)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(ref, top, -1), atol=1e-4)


def test_prompt_logprobs_memory_is_one_chunk_of_logits(monkeypatch):
    """XLA's memory analysis of the compiled prompt logprobs: temporaries for a few chunks of
    f32 logits, well under the whole bucket's [T, V] (what ran a 16384-token step out of memory)."""
    from jaxpaged.engine import step_programs

    monkeypatch.setattr(step_programs, "PROMPT_LOGPROBS_ROWS", 256)
    t, h, v = 2048, 32, 4000
    w = jnp.zeros((h, v), jnp.float32)
    f = jax.jit(lambda x, n: step_programs._prompt_logprobs(lambda y: y @ w, x, n))
    mem = f.lower(jax.ShapeDtypeStruct((t, h), jnp.float32), jax.ShapeDtypeStruct((t,), jnp.int32)).compile()
    assert mem.memory_analysis().temp_size_in_bytes < t * v * 4 / 2
