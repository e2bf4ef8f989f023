"""Tensor parallelism on fake CPU devices: the same tokens as one device, through the engine."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from jaxpaged import LLM, SamplingParams
from jaxpaged.models import ConfigError
from jaxpaged.engine.mesh import make_mesh

ENGINE = dict(max_model_len=128, block_size=4, max_num_seqs=16, max_num_batched_tokens=32, num_kv_blocks=40)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama-tp")


@pytest.fixture(scope="module")
def requests():
    rng = np.random.default_rng(0)
    shared = rng.integers(0, 500, 12).tolist()
    prompts = [(shared if i % 3 == 0 else []) + rng.integers(0, 500, int(rng.integers(3, 30))).tolist()
               for i in range(16)]
    params = [SamplingParams(temperature=0, max_tokens=int(rng.integers(4, 20)), ignore_eos=True) for _ in prompts]
    params[5] = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True)
    params[7] = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=2)  # the `full` head
    return prompts, params


def prompt_logprobs(out) -> list:
    """(position, token, logprob) of every prompt logprob entry."""
    return [(p, t, v.logprob) for p, e in enumerate(out.prompt_logprobs) if e for t, v in sorted(e.items())]


@pytest.fixture(scope="module")
def reference(model_dir, requests):
    llm = LLM(model_dir, **ENGINE)
    outs = llm.generate(*requests, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], prompt_logprobs(outs[7])


@pytest.mark.parametrize("tp,steps", [(2, 1), (8, 1), (2, 4)])  # tp=4: test_more_devices_than_kv_heads
def test_tp_matches_one_device(tp, steps, model_dir, requests, reference, compile_counter, monkeypatch):
    """steps: multi-step decode iterations (4: the decode loop, sharded, in place of most steps).
    The `full` head computes prompt logprobs over vocab-sharded logits, 8 rows at a time."""
    from jaxpaged.engine import step_programs
    from jaxpaged.engine.sample.features import LOOP_VARIANTS, VARIANTS

    monkeypatch.setattr(step_programs, "PROMPT_LOGPROBS_ROWS", 8)
    assert len(jax.devices()) >= tp
    traces = step_programs.num_step_compiles()
    llm = LLM(model_dir, tensor_parallel_size=tp, num_scheduler_steps=steps, **ENGINE)
    engine = llm.engine
    # each program traced once at start-up: the heads, compiled before the forward for the KV
    # sizing, match the replicated hidden states the forward leaves
    forwards = len(engine.runner.buckets) + len(engine.runner.short_query_buckets)
    loops = len(engine.runner.loop_buckets) * len(LOOP_VARIANTS)
    assert step_programs.num_step_compiles() - traces == forwards + len(engine.runner.buckets) * len(VARIANTS) + loops
    assert bool(loops) == (steps > 1)
    wqkv = engine.runner.params["layers"][0]["wqkv"]
    assert isinstance(wqkv.sharding, NamedSharding) and len(wqkv.sharding.device_set) == tp
    assert wqkv.addressable_shards[0].data.shape[1] == 8 // tp  # KV heads split over the mesh
    assert engine.runner.kv.k.addressable_shards[0].data.shape[1] == 8 // tp
    compiles = compile_counter.count
    launched = []
    launch = engine.runner.launch
    engine.runner.launch = lambda sched, variant: launched.append(sched.multi_step) or launch(sched, variant)
    outs = llm.generate(*requests, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference[0]
    got, ref = prompt_logprobs(outs[7]), reference[1]
    assert [g[:2] for g in got] == [r[:2] for r in ref] and len(ref) > 20
    np.testing.assert_allclose([g[2] for g in got], [r[2] for r in ref], atol=1e-4)
    assert any(launched) == (steps > 1)  # the decode loop ran
    assert engine.scheduler.num_preemptions > 0  # the small pool forced recomputes
    assert engine.block_manager.prefix_cache_hits > 0
    assert compile_counter.count == compiles, "compiled after warm-up"


def test_more_devices_than_kv_heads_replicates_them(tiny_model_dir):
    """llama: 4 query heads, 2 KV heads; 4 devices hold one KV-head copy and one query head each."""
    model = tiny_model_dir("llama")
    prompts = [list(range(10, 40)), [5, 6, 7]]
    p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(model, **ENGINE).generate(prompts, p, use_tqdm=False)]
    llm = LLM(model, tensor_parallel_size=4, **ENGINE)
    assert llm.engine.model_config.num_kv_heads == 4 and llm.engine.model_config.kv_head_replicas == 2
    assert llm.engine.runner.kv.k.addressable_shards[0].data.shape[1] == 1
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)] == want


def test_tp_that_does_not_divide_the_heads_is_a_clear_error(tiny_model_dir):
    with pytest.raises(ConfigError, match="tensor_parallel_size 8 does not divide the model's 4 attention heads"):
        LLM(tiny_model_dir("llama"), tensor_parallel_size=8, **ENGINE)


def test_mesh_needs_enough_devices():
    with pytest.raises(ValueError, match="needs 64 devices"):
        make_mesh(64)
