"""Model parity with HF transformers (PyTorch, float32) through the paged KV cache.

Several sequences of different lengths share one ragged batch; each owns shuffled,
non-contiguous blocks of the pool. The same prompts are fed whole, in 3 chunks, and then
decoded 16 steps; logits must match HF's within 1e-4 relative error, and greedy
generation must match HF `generate` token for token.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxpaged.kernels.paged_attention import paged_attention_ref
from jaxpaged.models import load_model, make_forward
from jaxpaged.models.kv_cache import init_kv_cache
from jaxpaged.models.step_input import make_step_input
from jaxpaged.models.tiny import VARIANTS

BLOCK, NUM_BLOCKS, MAX_BLOCKS = 4, 64, 16  # 64-token context per sequence
T_BUCKET, S_BUCKET = 64, 4
PROMPT_LENS = (23, 9, 30)


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


class PagedRunner:
    """Drives the jitted forward like an engine would: block tables, computed counts, padding."""

    def __init__(self, model_dir, num_seqs: int, seed: int = 0):
        self.cfg, self.params = load_model(model_dir)
        self.fwd = make_forward(self.cfg, paged_attention_ref)
        self.kv = init_kv_cache(self.cfg, NUM_BLOCKS, BLOCK, jnp.float32)
        blocks = np.random.default_rng(seed).permutation(np.arange(1, NUM_BLOCKS))  # skip scratch 0
        self.tables = [list(blocks[i * MAX_BLOCKS:(i + 1) * MAX_BLOCKS]) for i in range(num_seqs)]
        self.computed = [0] * num_seqs

    def step(self, new_tokens: list[list[int]], all_logits: bool = False) -> list[np.ndarray]:
        """Feed new tokens per sequence (may be empty); returns logits per sequence."""
        live = [i for i, toks in enumerate(new_tokens) if toks]
        seqs = [(new_tokens[i], self.computed[i], self.tables[i]) for i in live]
        n = sum(len(new_tokens[i]) for i in live)
        bucket = T_BUCKET if n > S_BUCKET else S_BUCKET
        inp = make_step_input(seqs, BLOCK, bucket, S_BUCKET, MAX_BLOCKS, all_logits=all_logits)
        logits, self.kv = self.fwd(self.params, self.kv, inp)
        logits = np.asarray(logits)
        out, start = [], 0
        for i in live:
            k = len(new_tokens[i]) if all_logits else 1
            out.append(logits[start:start + k] if all_logits else logits[len(out)])
            start += k
            self.computed[i] += len(new_tokens[i])
        return out


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request, tiny_model_dir):
    path = tiny_model_dir(request.param)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return path, hf.eval()


def hf_logits(hf, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENS]


def test_prompt_chunks_and_decode_match_hf(model):
    path, hf = model
    runner = PagedRunner(path, len(PROMPT_LENS))
    ps = prompts(runner.cfg.vocab_size)
    rng = np.random.default_rng(2)
    decode = [rng.integers(0, runner.cfg.vocab_size, 16).tolist() for _ in ps]
    refs = [hf_logits(hf, p + d) for p, d in zip(ps, decode)]

    # (a) whole prompts in one ragged step, logits at every position
    whole = PagedRunner(path, len(ps), seed=3).step(ps, all_logits=True)
    for got, p, ref in zip(whole, ps, refs):
        assert rel_err(got, ref[: len(p)]) <= 1e-4

    # (b) the same prompts as 3 chunks of uneven sizes through the paged cache
    cuts = [np.array_split(np.arange(len(p)), 3) for p in ps]
    chunks = [[] for _ in ps]
    for c in range(3):
        got = runner.step([[p[j] for j in cut[c]] for p, cut in zip(ps, cuts)], all_logits=True)
        for i, g in enumerate(got):
            chunks[i].append(g)
    for i, (p, ref) in enumerate(zip(ps, refs)):
        assert rel_err(np.concatenate(chunks[i]), ref[: len(p)]) <= 1e-4

    # (c) 16 decode steps after it, all sequences in one batch
    for step in range(16):
        got = runner.step([[d[step]] for d in decode])
        for g, p, ref in zip(got, ps, refs):
            assert rel_err(g, ref[len(p) + step]) <= 1e-4, f"decode step {step}"


def test_greedy_generation_matches_hf(model):
    path, hf = model
    runner = PagedRunner(path, len(PROMPT_LENS))
    ps = prompts(runner.cfg.vocab_size, seed=4)
    outs = [[] for _ in ps]
    nxt = [int(np.argmax(g)) for g in runner.step(ps)]
    for _ in range(32):
        for o, t in zip(outs, nxt):
            o.append(t)
        nxt = [int(np.argmax(g)) for g in runner.step([[t] for t in nxt])]
    gen = transformers.GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    hf.generation_config.eos_token_id = None  # never stop early at EOS
    for p, o in zip(ps, outs):
        with torch.no_grad():
            ids = torch.tensor([p])  # explicit mask: HF would otherwise mask token 0 (= pad) as padding
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)[0, len(p):].tolist()
        assert len(ref) == 32 and o == ref
