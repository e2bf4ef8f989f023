"""Draft-model speculative decoding in the engine: greedy outputs token-identical to the engine
without speculation (test_spec_decode_engine.py's workload) with a different random draft, a
noisy copy of the target (drafts accepted and rejected), an OPT draft and the target itself
(every draft accepted: the draft's KV catch-up is exact), with preemption and at batch 1, and
Mistral (sliding window) drafting for itself; the drafts are HF's greedy continuation of the
draft model after rejections; sampled rows whose first two tokens follow the target's exact
softmax (HF as the oracle, chi-square over 20,000 requests); no block leaked, nothing compiled
after warm-up; the config errors and the pool sizing."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hf_oracle import hf_logits_of
from safetensors.numpy import load_file, save_file
from test_spec_decode import _pvalue
from test_spec_decode_engine import KW, _logprobs, aborts_after_rejections_free_every_block, _same_logprobs, model_dir, workload  # noqa: F401 - fixtures

from jaxpaged import LLM, SamplingParams
from jaxpaged.engine.config import EngineConfig
from jaxpaged.models.tiny import make_tiny_model


def _spec(draft) -> dict:
    return {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3, "disable_by_batch_size": None}


@pytest.fixture(scope="module")
def drafts(model_dir, tiny_model_dir, tmp_path_factory):  # noqa: F811 - the imported fixture
    """Draft folders, all with the target's tokenizer: `self` the target; `other` a llama with
    other random weights (its greedy tokens rarely agree); `noisy` the target's weights plus
    noise (agrees often, not always); `opt` another family."""
    return {"self": model_dir, "noisy": _noisy_copy(model_dir, tmp_path_factory.mktemp("noisy")), "other": make_tiny_model(tmp_path_factory.mktemp("other"), seed=1),
            "opt": tiny_model_dir("opt")}


CONFIGS = {  # name: (draft, engine arguments)
    "noisy-seqs64": ("noisy", {}),
    "noisy-seqs1": ("noisy", {"max_num_seqs": 1}),
    "noisy-preempt": ("noisy", {"num_kv_blocks": 40}),
    "self": ("self", {}),
    "other": ("other", {}),
    "opt-family": ("opt", {}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_outputs_match_the_engine_without_speculation(name, model_dir, drafts, workload,  # noqa: F811
                                                              compile_counter):
    prompts, params, base = workload
    draft, kw = CONFIGS[name]
    llm = LLM(model_dir, **{**KW, "speculative_config": _spec(drafts[draft]), **kw})
    compiles = compile_counter.count
    outs = llm.generate(prompts, params, use_tqdm=False)
    same = [i for i in range(len(prompts)) if i != 4]  # all but the sampled row that speculates
    assert [[(c.token_ids, c.text, c.finish_reason) for c in outs[i].outputs] for i in same] == \
        [[(c.token_ids, c.text, c.finish_reason) for c in base[i].outputs] for i in same]
    _same_logprobs(_logprobs(outs[2]), _logprobs(base[2]))  # the top-5 logprobs row speculates too
    stats = llm.engine.core.stats()
    accepted, drafted = stats.spec_decode_num_accepted_tokens, stats.spec_decode_num_draft_tokens
    assert drafted > 100 and accepted == sum(stats.spec_decode_num_accepted_tokens_per_pos)
    if draft == "self":  # greedy rows on new prompts: the draft's KV is the target's, every draft its argmax
        rng = np.random.default_rng(5)
        fresh = [rng.integers(0, 500, int(rng.integers(5, 30))).tolist() for _ in range(8)]
        llm.generate(fresh, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
        after = llm.engine.core.stats()
        assert after.spec_decode_num_accepted_tokens - accepted == after.spec_decode_num_draft_tokens - drafted > 100
    elif draft == "noisy":
        assert 0.2 * drafted < accepted < drafted
    if name.endswith("preempt"):
        assert llm.engine.scheduler.num_preemptions > 0
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks  # nothing leaked
    assert compile_counter.count == compiles, "the engine compiled after warm-up"


def test_drafts_are_the_draft_models_greedy_continuation(model_dir, drafts, workload):  # noqa: F811
    """Every row's drafts (sampled rows: rejections, then a catch-up over the accepted tokens and
    the one drawn) are HF's greedy continuation of the draft model from the row's tokens."""
    prompts, _, _ = workload
    llm = LLM(model_dir, **KW, speculative_config=_spec(drafts["noisy"]))
    proposed, fill = [], llm.engine.core.drafter.fill

    def recording_fill(rows):
        fill(rows)
        proposed.extend((list(r.request.all_token_ids), r.draft_token_ids) for r in rows if r.draft_token_ids)

    llm.engine.core.drafter.fill = recording_fill
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=25, ignore_eos=True, seed=0)
    llm.generate(prompts[:6], params, use_tqdm=False)
    stats = llm.engine.core.stats()
    assert 0.1 < stats.spec_decode_num_accepted_tokens / stats.spec_decode_num_draft_tokens < 0.9
    draft = hf_logits_of(drafts["noisy"])
    assert len(proposed) > 60
    for context, tokens in proposed[::3]:  # a third of them, spread over the run (HF's time)
        greedy = list(context)
        for _ in tokens:
            greedy.append(int(np.argmax(draft(greedy)[-1])))
        assert tokens == greedy[len(context):]


def test_another_architecture_accepts_its_own_drafts(tiny_model_dir):
    """Mistral (a sliding window of 8, shorter than the prompts) drafting for itself in a
    one-bucket engine: outputs as without speculation, every greedy draft accepted."""
    model = tiny_model_dir("mistral")
    kw = {"max_model_len": 64, "block_size": 4, "num_kv_blocks": 256, "max_num_seqs": 8,
          "max_num_batched_tokens": 16}
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 500, int(rng.integers(10, 30))).tolist() for _ in range(6)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(model, **kw).generate(prompts, params, use_tqdm=False)]
    llm = LLM(model, **kw, speculative_config=_spec(model))
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    stats = llm.engine.core.stats()
    assert stats.spec_decode_num_accepted_tokens == stats.spec_decode_num_draft_tokens > 50


def _noisy_copy(src, dest, scale: float = 0.1):
    """The checkpoint in `src` with its weights plus noise: its drafts agree often, not always."""
    shutil.copytree(src, dest, dirs_exist_ok=True)
    rng = np.random.default_rng(0)
    weights = load_file(src / "model.safetensors")
    save_file({k: w + scale * w.std() * rng.standard_normal(w.shape).astype(w.dtype) for k, w in weights.items()},
              dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_the_pool_sizing_counts_the_draft_kv(monkeypatch):
    """On a CPU the pool takes `cpu_kv_cache_bytes`: with a draft model each block costs its KV too."""
    from jaxpaged.engine.device_memory import kv_pool_blocks
    from jaxpaged.models.config import ModelConfig
    from jaxpaged.models.kv_cache import kv_bytes_per_block

    cfg = ModelConfig("LlamaForCausalLM", "llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128,
                      dtype="float32")
    draft = ModelConfig("LlamaForCausalLM", "llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                        num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=128,
                        dtype="float32")
    config = EngineConfig(model="x", max_num_seqs=256, block_size=4, cpu_kv_cache_bytes=1 << 20)
    target_bytes, draft_bytes = (kv_bytes_per_block(c, 4, np.float32) for c in (cfg, draft))
    assert kv_pool_blocks(config, cfg, 128, 16, np.float32, 0) == (1 << 20) // target_bytes
    assert kv_pool_blocks(config, cfg, 128, 16, np.float32, 0, draft=draft) == (1 << 20) // (target_bytes + draft_bytes)
    one_seat = EngineConfig(model="x", max_num_seqs=1, block_size=4, cpu_kv_cache_bytes=1 << 20)
    assert kv_pool_blocks(one_seat, cfg, 126, 16, np.float32, 0) == 32 + 1  # a whole context and the scratch block


def test_aborts_after_rejections_free_every_block(model_dir, drafts, workload):  # noqa: F811
    prompts, _, _ = workload
    aborts_after_rejections_free_every_block(
        LLM(model_dir, **KW, speculative_config=_spec(drafts["noisy"]), enable_prefix_caching=False), prompts)


N = 3_000
PROMPT = [337, 113, 181, 324, 164]  # its top-3 cuts (and those after each of its top 3) have margins


def test_sampled_tokens_follow_the_targets_softmax(model_dir, drafts):  # noqa: F811
    """temperature 1, top_k 3, max_tokens 3: the first token comes from the prompt's step, the
    second from verifying the draft's greedy token (max_tokens leaves one draft of the k = 3):
    the joint of the two against HF's top-3 softmax after the prompt and after each first token."""
    llm = LLM(model_dir, **KW, speculative_config=_spec(drafts["noisy"]))
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True, detokenize=False)
    outs = llm.generate([PROMPT] * N, params, use_tqdm=False)
    firsts = np.array([o.outputs[0].token_ids[:2] for o in outs])
    stats = llm.engine.core.stats()
    assert 0.1 * N < stats.spec_decode_num_accepted_tokens < 0.9 * N  # drafts accepted and rejected

    target, draft = hf_logits_of(model_dir), hf_logits_of(drafts["noisy"])

    def top3(ids) -> dict[int, float]:
        x = target(ids)[-1]
        top = np.argsort(-x)[:4]
        assert x[top[2]] - x[top[3]] > 0.03, "a tie at the top_k cut"
        p = np.exp(x[top[:3]] - x[top[0]])
        return dict(zip(top[:3].tolist(), p / p.sum()))

    exact, resampled = {}, {}  # P(first, second): exact; and from a verify that redraws from p on rejection
    for a, pa in top3(PROMPT).items():
        p1 = top3(PROMPT + [a])
        d = int(np.argmax(draft(PROMPT + [a])[-1]))  # the draft's greedy token after a
        pd = p1.get(d, 0.0)
        for b, pb in p1.items():
            exact[a, b], resampled[a, b] = pa * pb, pa * ((b == d) * pd + (1 - pd) * pb)
    cells = {pair: i for i, pair in enumerate(exact)}
    counts = np.bincount([cells.get((a, b), len(cells)) for a, b in firsts], minlength=len(cells) + 1)
    assert counts[-1] == 0, "a pair outside the target's top 3"
    assert _pvalue(counts[:-1], np.array(list(exact.values())) * N) > 1e-3
    # the test can fail: a rejection that redrew from p (the draft token not removed) is seen
    assert _pvalue(counts[:-1], np.array(list(resampled.values())) * N) < 1e-6


def test_config_errors_name_the_mismatch(model_dir, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="draft_model runs in one process"):
        EngineConfig(model=str(model_dir), num_processes=2, coordinator_address="localhost:1",
                     speculative_config=_spec(model_dir))
    other = tmp_path / "vocab"  # the target with 8 more (zero) embeddings and LM head rows
    shutil.copytree(model_dir, other)
    weights = load_file(model_dir / "model.safetensors")
    save_file({k: np.pad(w, ((0, 8), (0, 0))) if k in ("model.embed_tokens.weight", "lm_head.weight") else w
               for k, w in weights.items()}, other / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"vocab_size": config["vocab_size"] + 8}))
    with pytest.raises(ValueError, match="has vocab_size 520, the target 512"):
        LLM(model_dir, **KW, speculative_config=_spec(other))
