"""Logits processors end to end: `LLM.generate` with greedy sampling against a greedy loop
over HF transformers logits (float32), with vLLM V1's semantics reimplemented in numpy here:
logit_bias added first (a non-argmax-invariant logits processor), then the repetition
penalty over every token seen in prompt + output (positive logits divided, others
multiplied), then frequency and presence penalties over output tokens only; and the token
constraints: `allowed_token_ids` (argmax over the subset) and `bad_words` (a word's last token
banned after its other tokens were generated)."""
from __future__ import annotations

import numpy as np
import pytest
from hf_oracle import hf_logits_of

from jaxpaged import LLM, SamplingParams

MAX_TOKENS = 12
MIN_GAP = 1e-3  # f32 HF and JAX logits agree to ~1e-4: closer top-2 logits could flip


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    # Same shapes as tests/test_engine.py / test_lifecycle.py: the compiled steps are reused.
    return LLM(model_dir, max_model_len=128, block_size=4, num_kv_blocks=1024, max_num_seqs=64,
               max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def hf_logits(model_dir):
    """HF's logits after the last of `ids` ([V])."""
    logits = hf_logits_of(model_dir)
    return lambda ids: logits(ids)[-1]


def np_process(logits, prompt, output, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0,
               logit_bias=None):
    """vLLM V1: logit bias, then repetition (prompt + output), frequency and presence (output)."""
    x = logits.copy()
    for tok, b in (logit_bias or {}).items():
        x[tok] += b
    seen = np.zeros(x.shape, bool)
    seen[list(prompt) + list(output)] = True
    x = np.where(seen, np.where(x > 0, x / repetition_penalty, x * repetition_penalty), x)
    counts = np.bincount(np.asarray(output, np.int64), minlength=x.shape[0])
    return x - frequency_penalty * counts - presence_penalty * (counts > 0)


def hf_greedy(hf_logits, prompt, params: dict, n=MAX_TOKENS):
    """(greedy ids over the processed HF logits, smallest top-2 gap over the steps)."""
    ids, gap = [], np.inf
    for _ in range(n):
        x = np_process(hf_logits(prompt + ids), prompt, ids, **params)
        top2 = np.sort(x)[-2:]
        gap = min(gap, top2[1] - top2[0])
        ids.append(int(x.argmax()))
    return ids, gap


_rng = np.random.default_rng(0)
_BASE = [_rng.integers(3, 500, int(_rng.integers(5, 15))).tolist() for _ in range(6)]
# Without penalties greedy repeats 160 after _BASE[4] and _BASE[1], 296 after _BASE[5], 252
# after _BASE[3]: those prompts carry the tokens greedy would emit, so prompt vs output matters.
CASES = [
    # presence / frequency ignore prompt tokens: 160 is emitted first, then penalised
    (_BASE[4] + [160, 160], dict(presence_penalty=0.8, frequency_penalty=0.3)),
    (_BASE[1] + [160, 45], dict(repetition_penalty=1.6)),
    (_BASE[2], dict(frequency_penalty=0.5, presence_penalty=-0.3, logit_bias={228: -1.0, 313: 0.6})),
    (_BASE[5] + [296], dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.4,
                            logit_bias={45: 0.5})),
    (_BASE[0], dict()),  # plain greedy in the same (penalised) batch
    (_BASE[4], dict(logit_bias={160: -100.0, 17: 1.0})),
    # bias before the repetition penalty ((l + b) / r): after it (l / r + b) 252 would be emitted first
    (_BASE[3] + [252], dict(repetition_penalty=1.8, logit_bias={252: 0.8})),
]


@pytest.fixture(scope="module")
def refs(hf_logits):
    out = []
    for prompt, params in CASES:
        ids, gap = hf_greedy(hf_logits, prompt, params)
        assert gap > MIN_GAP, (params, gap)  # the comparison is not at the mercy of rounding
        out.append(ids)
    return out


def test_penalties_and_logit_bias_match_hf_greedy_loop(llm, hf_logits, refs):
    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                             **p) for _, p in CASES]
    outs = llm.generate([prompt for prompt, _ in CASES], params, use_tqdm=False)
    for out, ref, (prompt, p) in zip(outs, refs, CASES):
        assert out.outputs[0].token_ids == ref, p
    # not vacuous: every processed case differs from plain greedy ...
    plain = [hf_greedy(hf_logits, prompt, {})[0] for prompt, _ in CASES]
    for ref, free, (_, p) in zip(refs, plain, CASES):
        assert (ref != free) == bool(p), p
    # ... and from what the wrong semantics would emit
    assert refs[0][0] == 160 and refs[0][1] != 160  # prompt tokens escape presence / frequency
    assert refs[1][0] != plain[1][0]  # ... but not the repetition penalty
    assert refs[6][0] != 252


def constrained_greedy(hf_logits, prompt, n=MAX_TOKENS, allowed=None, bad_words_ids=()):
    """(greedy ids, smallest top-2 gap): argmax over `allowed` (all if None) minus the bad
    words' last tokens whose other tokens the output ends with (vLLM's rule, prompt excluded)."""
    ids, gap = [], np.inf
    for _ in range(n):
        x = hf_logits(prompt + ids)
        if allowed is not None:
            x = np.where(np.isin(np.arange(x.shape[0]), allowed), x, -np.inf)
        for word in bad_words_ids:
            if len(word) - 1 <= len(ids) and ids[len(ids) - len(word) + 1:] == word[:-1]:
                x[word[-1]] = -np.inf
        top2 = np.sort(x)[-2:]
        gap = min(gap, top2[1] - top2[0])
        ids.append(int(x.argmax()))
    return ids, gap


def test_allowed_token_ids_and_bad_words_match_hf_greedy_loop(llm, hf_logits):
    tok = llm.get_tokenizer()
    prompt = tok.encode("The quick brown fox")
    enc = lambda w: tok.encode(w, add_special_tokens=False)  # noqa: E731
    plain, _ = constrained_greedy(hf_logits, prompt)
    allowed = [t for t in range(3, 500, 7) if t not in plain]
    # vLLM tokenizes each bad word as given and with a leading space; the spaced form counts
    # only where it has as many tokens and another first token: " mo" does, " dellt" does not
    assert len(enc(" dellt")) != len(enc("dellt")) and len(enc(" mo")) == len(enc("mo")) == 1
    bad_ids = [enc("dellt"), enc("mo"), enc(" mo")]
    want_allowed, gap_a = constrained_greedy(hf_logits, prompt, allowed=allowed)
    want_bad, gap_b = constrained_greedy(hf_logits, prompt, bad_words_ids=bad_ids)
    assert min(gap_a, gap_b) > MIN_GAP
    # "aue" ends with a token greedy emits, but after other tokens than "aue"'s: nothing is banned
    aue = [enc("aue"), enc(" aue")]
    assert aue[0][-1] == aue[1][-1] in plain and constrained_greedy(hf_logits, prompt, bad_words_ids=aue)[0] == plain
    kw = dict(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([prompt] * 4, [SamplingParams(allowed_token_ids=allowed, **kw),
                                       SamplingParams(bad_words=["dellt", "mo"], **kw), SamplingParams(**kw),
                                       SamplingParams(bad_words=["aue"], **kw)], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [want_allowed, want_bad, plain, plain]
    # not vacuous: greedy emits "dellt"'s first token, then its second is banned (only there),
    # and it would emit " mo"
    dellt, mo = enc("dellt"), enc(" mo")[0]
    at = plain.index(dellt[0])
    assert plain[at + 1] == dellt[1] and want_bad[at] == dellt[0] and want_bad[at + 1] != dellt[1]
    assert mo in plain and mo not in want_bad and want_allowed != plain
    with pytest.raises(ValueError, match="allowed_token_ids"):
        llm.generate([prompt], SamplingParams(allowed_token_ids=[3, 512], **kw), use_tqdm=False)
