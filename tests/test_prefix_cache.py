"""Prefix caching end to end: a cached block is reused only after the same prefix. Its KV was
computed at its positions and after the blocks before it, so the same tokens after another
prefix (or first) must be computed again."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from jaxpaged import LLM, SamplingParams

# Same shapes as tests/test_engine.py's configs: the compiled steps are reused.
SHAPES = dict(max_model_len=128, block_size=4, num_kv_blocks=1024, max_num_seqs=64, max_num_batched_tokens=64)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def hf_greedy(model_dir, prompts: list[list[int]], n: int) -> list[list[int]]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen = transformers.GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    refs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)  # explicit mask: 0 is pad
            refs.append(out[0, len(p):].tolist())
    return refs


def test_cached_block_is_not_reused_after_another_prefix(model_dir):
    """After [A, B, ...] and [D, ...] are cached (A, B, D full blocks of random ids), the
    prompts [B, ...] (B first), [C, B, ...] (C never seen) and [D, B, ...] (D cached, but B
    never after it) hit only the blocks of their own cached prefix: none, none and D."""
    rng = np.random.default_rng(0)
    A, B, C, D = (rng.integers(3, 500, 4).tolist() for _ in range(4))
    tail = lambda: rng.integers(3, 500, 3).tolist()  # noqa: E731
    prompts = {"D...": D + tail(), "AB...": A + B + tail(), "B...": B + tail(), "CB...": C + B + tail(),
               "DB...": D + B + tail()}
    expected_hits = {"D...": 0, "AB...": 0, "B...": 0, "CB...": 0, "DB...": 4}

    llm = LLM(model_dir, **SHAPES)
    bm = llm.engine.block_manager
    outs, hits = {}, {}
    for name, prompt in prompts.items():  # one at a time: each sees the blocks cached before it
        before = bm.prefix_cache_hits
        out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
        hits[name] = bm.prefix_cache_hits - before
        assert out.num_cached_tokens == hits[name]
        outs[name] = out.outputs[0].token_ids
    assert hits == expected_hits
    assert bm.num_free_blocks == bm.num_total_blocks

    cold = LLM(model_dir, enable_prefix_caching=False, **SHAPES)
    cold_outs = {name: o.outputs[0].token_ids
                 for name, o in zip(prompts, cold.generate(list(prompts.values()), GREEDY, use_tqdm=False))}
    assert outs == cold_outs
    assert list(outs.values()) == hf_greedy(model_dir, list(prompts.values()), GREEDY.max_tokens)
