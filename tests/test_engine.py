"""The engine end to end: continuous batching against HF greedy generate, and invariance of
outputs to batch size, token budget, chunking, prefix caching and preemption."""
from __future__ import annotations

import gc
import sys

import numpy as np
import pytest
import torch
import transformers

from jaxpaged import LLM, SamplingParams
from jaxpaged.engine.model_runner import GIL_SWITCH_INTERVAL_S

MAX_LEN = 128


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def workload(model_dir):
    """64 requests with varied prompt and output lengths, and HF greedy outputs for them."""
    rng = np.random.default_rng(0)
    shared = rng.integers(0, 500, 16).tolist()  # some prompts share a 4-block prefix
    prompts, lengths = [], []
    for i in range(64):
        own = rng.integers(0, 500, int(rng.integers(3, 40))).tolist()
        prompts.append(shared + own if i % 4 == 0 else own)
        lengths.append(int(rng.integers(1, 25)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # never stop early (the engine runs with ignore_eos)
    refs = []
    for p, n in zip(prompts, lengths):
        gen = transformers.GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            ids = torch.tensor([p])  # explicit mask: HF would otherwise mask token 0 (= pad) as padding
            refs.append(hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)[0, len(p):].tolist())
            assert len(refs[-1]) == n
    return prompts, lengths, refs


def make_llm(model_dir, **kw) -> LLM:
    kw = {"max_model_len": MAX_LEN, "block_size": 4, "num_kv_blocks": 1024, **kw}
    return LLM(model_dir, **kw)


CONFIGS = {
    "seqs64-budget2048": dict(max_num_seqs=64, max_num_batched_tokens=2048),
    "seqs1-budget64": dict(max_num_seqs=1, max_num_batched_tokens=64),
    "seqs4-budget16": dict(max_num_seqs=4, max_num_batched_tokens=16),
    "seqs64-budget64-nocache": dict(max_num_seqs=64, max_num_batched_tokens=64, enable_prefix_caching=False),
    "seqs64-budget64-buckets24,40": dict(max_num_seqs=64, max_num_batched_tokens=64, token_buckets=(24, 40)),
    "preempt": dict(max_num_seqs=64, max_num_batched_tokens=64, num_kv_blocks=48),
    "preempt-sync": dict(max_num_seqs=64, max_num_batched_tokens=64, num_kv_blocks=48, async_scheduling=False),
    # multi-step decode: all-decode steps run 4 (3) iterations per dispatch; with preemption
    "multistep4": dict(max_num_seqs=64, max_num_batched_tokens=64, num_scheduler_steps=4),
    "multistep3-preempt": dict(max_num_seqs=64, max_num_batched_tokens=64, num_kv_blocks=48, num_scheduler_steps=3),
    # the Pallas GPU kernel, here in Pallas interpret mode
    "pallas-seqs4-budget16": dict(max_num_seqs=4, max_num_batched_tokens=16, attention_backend="pallas"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_hf_under_every_schedule(name, model_dir, workload, compile_counter):
    prompts, lengths, refs = workload
    llm = make_llm(model_dir, **CONFIGS[name])
    compiles = compile_counter.count
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, ref in zip(outs, refs):
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].finish_reason == "length"
    engine = llm.engine
    if name.startswith("preempt"):
        assert engine.scheduler.num_preemptions > 0
    if "buckets" in name:  # steps padded to the given sizes, the budget added
        assert engine.runner.buckets == [24, 40, 64]
    if name.startswith("multistep"):  # the CPU's buckets up to the budget (platform_defaults)
        assert engine.runner.loop_buckets == [16, 64]
    if name == "seqs4-budget16":  # prompts longer than the budget were chunked
        assert max(len(p) for p in prompts) > 16
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks  # nothing leaked: every block free or cached
    assert compile_counter.count == compiles, "the engine compiled after warm-up"


def test_default_buckets_add_steps_where_decode_gemms_are_compute_bound():
    from jaxpaged.engine.buckets import token_buckets
    b = token_buckets(2048, 256)
    assert b == sorted(set(b)) and b[0] == 16 and b[-1] == 2048  # every step size has a bucket
    assert [t for t in b if 128 < t < 256] == [192]  # decode steps of 129-192 rows are not padded to 256
    assert token_buckets(2048, 128) == [t for t in b if t != 192]  # none beyond max_num_seqs
    assert token_buckets(100, 256) == [16, 32, 64, 100]


def test_short_query_forwards_stop_at_a_full_decode_batch():
    """The decode-launch forward variant is compiled for buckets above DECODE_ONLY_MAX_TOKENS that a
    decode-only step can use (up to the bucket of max_num_seqs rows), not for larger ones."""
    from jaxpaged.engine.buckets import short_query_buckets, token_buckets
    assert short_query_buckets(token_buckets(2048, 256), 256) == [64, 128, 192, 256]  # not 512 / 1024 / 2048
    assert short_query_buckets(token_buckets(2048, 200), 200) == [64, 128, 192, 256]  # 200 rows pad to 256
    assert short_query_buckets([16, 32, 64], 64) == [64]
    assert short_query_buckets([16, 24], 3) == []


def test_prefill_buckets_run_the_forward_compiled_with_cublas_gemms(model_dir, compile_counter):
    """Steps above a full decode batch run the forward's prefill twin, compiled with
    PREFILL_COMPILER_OPTIONS (real XLA flags: an unknown one fails every GPU compile); decode
    steps the other. Warm-up compiles each bucket in the program its steps use."""
    import jax
    import jax.numpy as jnp

    from jaxpaged.engine import step_programs
    from jaxpaged.engine.sample.features import GREEDY
    from jaxpaged.engine.scheduler_output import SchedulerOutput

    f = jax.jit(lambda x: x @ x + 1, compiler_options=step_programs.PREFILL_COMPILER_OPTIONS)
    np.testing.assert_allclose(f(jnp.eye(4)), np.eye(4) + 1)
    llm = LLM(model_dir, max_model_len=MAX_LEN, block_size=4, max_num_seqs=2, max_num_batched_tokens=40,
              token_buckets=(8, 16))
    runner = llm.engine.runner
    assert runner.buckets == [8, 16, 40] and runner.decode_buckets == [8]
    program = {t: runner.forward_program(runner.inputs.build(SchedulerOutput([]), t, GREEDY).step_layout)
               for t in runner.buckets}
    assert program == {8: runner._fwd, 16: runner._fwd_prefill, 40: runner._fwd_prefill}
    compiles = compile_counter.count
    out = llm.generate([[5] * 30, [7] * 3], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [4, 4]
    assert compile_counter.count == compiles, "a step ran a forward that warm-up did not compile"


def test_prefix_cache_computes_only_new_tokens(model_dir):
    llm = make_llm(model_dir, max_num_seqs=8, max_num_batched_tokens=64)
    engine = llm.engine
    prefix = list(range(100, 112))  # 3 full blocks of 4
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = llm.generate([prefix + [7, 8]], greedy, use_tqdm=False)[0]
    computed = engine.core.num_prompt_tokens
    hits = engine.block_manager.prefix_cache_hits
    second = llm.generate([prefix + [9, 10, 11]], greedy, use_tqdm=False)[0]
    assert engine.core.num_prompt_tokens - computed == 3  # only the new tokens
    assert engine.block_manager.prefix_cache_hits - hits == 12
    assert second.num_cached_tokens == 12
    cold = make_llm(model_dir, max_num_seqs=8, max_num_batched_tokens=64, enable_prefix_caching=False)
    assert cold.generate([prefix + [9, 10, 11]], greedy, use_tqdm=False)[0].outputs[0].token_ids \
        == second.outputs[0].token_ids
    assert first.num_cached_tokens == 0


def test_seeded_sampling_is_batch_independent(model_dir):
    llm = make_llm(model_dir, max_num_seqs=16, max_num_batched_tokens=64)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate(["Hello world"], p, use_tqdm=False)[0].outputs[0].text
    others = [SamplingParams(temperature=0.7, seed=s, max_tokens=12, ignore_eos=True) for s in range(5)]
    batch = llm.generate(["Readability counts.", "Hello world", "Flat is better"] * 2,
                         [others[0], p, others[1], others[2], others[3], others[4]], use_tqdm=False)
    assert batch[1].outputs[0].text == alone
    other_seed = llm.generate(["Hello world"], SamplingParams(temperature=1.0, top_p=0.9, seed=99,
                                                              max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert other_seed[0].outputs[0].text != alone


def test_start_up_freezes_the_heap(model_dir):
    """The engine's start-up heap goes to the collector's permanent generation (`gc.freeze`), so
    a full collection while serving scans only what came after, not the engine's objects."""
    gc.unfreeze()
    llm = make_llm(model_dir, max_num_seqs=4, max_num_batched_tokens=16)
    core = llm.engine.core
    tracked = {id(o) for o in gc.get_objects()}
    assert not {id(o) for o in (core, core.scheduler, core.runner, core.block_manager, llm.engine.processor,
                                llm.engine.output)} & tracked
    assert gc.get_freeze_count() > 10 * len(tracked)
    out = llm.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    gc.collect()  # the requests' garbage, beside the frozen heap
    assert len(out[0].outputs[0].token_ids) == 4


def test_a_dropped_engine_is_freed_though_the_heap_is_frozen(model_dir):
    """Frozen objects are never collected as cycles, so the engine must hold none: an `LLM` a
    notebook drops (and its KV pool) goes as soon as its last reference does."""
    import weakref

    llm = make_llm(model_dir, max_num_seqs=4, max_num_batched_tokens=16)
    llm.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    refs = [weakref.ref(x) for x in (llm.engine, llm.engine.core, llm.engine.core.runner, llm.engine.core.scheduler)]
    del llm
    assert all(r() is None for r in refs)


def test_request_larger_than_the_pool_is_rejected(model_dir):
    small = make_llm(model_dir, num_kv_blocks=20, max_num_seqs=4, max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="needs 25 KV blocks but the pool has only 19"):
        small.generate([list(range(20))], SamplingParams(max_tokens=80), use_tqdm=False)


def test_async_scheduling_keeps_steps_in_flight(model_dir, compile_counter):
    """With async scheduling, up to `max_steps_in_flight` launched steps wait unprocessed
    (their sampled ids fed back on the device), and the outputs are those of the synchronous
    engine. A row with top-N logprobs needs no history: its steps launch whole, never late, on
    programs the warm-up compiled."""
    outs = {}
    for depth, kw in ((0, dict(async_scheduling=False)), (1, dict(max_steps_in_flight=1)), (2, {})):
        llm = make_llm(model_dir, max_num_seqs=64, max_num_batched_tokens=64, **kw)
        engine = llm.engine
        for i in range(3):
            engine.add_request(str(i), list(range(30 + i, 50)), SamplingParams(
                temperature=0, max_tokens=8 + i, ignore_eos=True, logprobs=2 if i == 2 else None))
        launch, late, compiles = engine.runner.launch, [], compile_counter.count
        engine.runner.launch = lambda sched, variant: late.append((launched := launch(sched, variant)).late) or launched
        in_flight, final = [], {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                o = out.outputs[0]
                final[out.request_id] = (o.token_ids, [{t: (lp.logprob, lp.rank) for t, lp in d.items()}
                                                       for d in o.logprobs or []])
            in_flight.append(len(engine.core._in_flight))
        assert max(in_flight) == depth and late and all(x is None for x in late)
        assert compile_counter.count == compiles, "the engine compiled after warm-up"
        outs[depth] = final
    assert outs[0] == outs[1] == outs[2] and [len(outs[0][str(i)][0]) for i in range(3)] == [8, 9, 10]
    assert len(outs[0]["2"][1]) == 10 and all(len(d) >= 2 for d in outs[0]["2"][1])
    # the dispatch worker gets the GIL back from the engine thread within 0.5 ms, not 5
    assert sys.getswitchinterval() <= GIL_SWITCH_INTERVAL_S


def test_multi_step_decode_samples_what_single_steps_sample(model_dir, compile_counter):
    """Multi-step decode (4 iterations per all-decode step, sampled ids fed back on the
    device) gives the outputs of single steps: seeded sampling with and without top-p, a stop
    token met inside a step's iterations (the tokens after it dropped), max_tokens not a
    multiple of 4; every block is freed and nothing compiles after warm-up."""
    prompts = [list(range(9 + i, 30)) for i in range(9)]
    single = make_llm(model_dir, max_num_seqs=16, max_num_batched_tokens=64)
    greedy = single.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].token_ids
    stop = next(t for i, t in enumerate(greedy) if i >= 5 and t not in greedy[:i])  # after a few steps
    params = ([SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop])]
              + [SamplingParams(temperature=0, max_tokens=7 + i, ignore_eos=True) for i in range(3)]
              + [SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=13, ignore_eos=True) for i in range(3)]
              + [SamplingParams(temperature=0.8, seed=i, max_tokens=10, logprobs=0, ignore_eos=True) for i in range(2)])
    multi = make_llm(model_dir, max_num_seqs=16, max_num_batched_tokens=64, num_scheduler_steps=4)
    compiles = compile_counter.count
    launched = []
    launch = multi.engine.runner.launch
    multi.engine.runner.launch = lambda sched, variant: launched.append(
        [r.num_sampled for r in sched.scheduled] if sched.multi_step else None) or launch(sched, variant)
    outs = {k: llm.generate(prompts, params, use_tqdm=False) for k, llm in ((1, single), (4, multi))}
    for a, b in zip(outs[1], outs[4]):
        a, b = a.outputs[0], b.outputs[0]
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        assert b.cumulative_logprob == pytest.approx(a.cumulative_logprob, abs=1e-4)
        assert [next(iter(e.values())).logprob for e in b.logprobs or []] == \
            pytest.approx([next(iter(e.values())).logprob for e in a.logprobs or []], abs=1e-4)
    assert outs[4][0].outputs[0].token_ids[-1] == stop and outs[4][0].outputs[0].finish_reason == "stop"
    assert [len(o.outputs[0].token_ids) for o in outs[4][1:4]] == [7, 8, 9]
    assert any(s and max(s) == 4 for s in launched) and any(s and min(s) < 4 for s in launched)
    bm = multi.engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks
    assert compile_counter.count == compiles, "the engine compiled after warm-up"


def test_step_drops_rows_of_sequences_finished_by_the_steps_it_processes_first(model_dir):
    """A request needing the `full` step variant (logprobs) makes the engine process every
    launched step before launching: a sequence with two pending tokens that stops on the
    first one (a stop token id) is then dropped from the step instead of reading a token it no
    longer has."""
    llm = make_llm(model_dir, max_num_seqs=8, max_num_batched_tokens=64)
    engine = llm.engine
    prompt = list(range(30, 50))
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    k = next(i for i in range(4, 12) if free[i] not in free[:i])  # stop there, at its first occurrence
    engine.add_request("stop", prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                      stop_token_ids=[free[k]]))
    (seq,) = engine.core.requests["stop"]
    outs = {}
    while not (seq.num_pending == 2 and len(seq.known_output_ids) == k):
        outs |= {out.request_id: out for out in engine.step()}
    engine.add_request("logprobs", [5, 6, 7], SamplingParams(temperature=0, max_tokens=3, logprobs=1))
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id] = out
    assert outs["stop"].outputs[0].token_ids == free[:k + 1] and outs["stop"].outputs[0].finish_reason == "stop"
    assert len(outs["logprobs"].outputs[0].logprobs) == 3
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks


def test_kv_sizing_reads_the_driver_where_the_allocator_keeps_no_stats(monkeypatch):
    """On a GPU whose allocator reports no memory statistics (XLA's VMM allocator, used by
    the command-buffer update mode SKIP_TEMP), the pool is sized from the CUDA driver's free
    and total memory of that device; where the driver does not answer either, the engine asks
    for num_kv_blocks instead of silently using the CPU default."""
    import functools
    import types

    import jax

    from jaxpaged.engine import device_memory
    from jaxpaged.engine.config import EngineConfig
    from jaxpaged.models.config import ModelConfig
    from jaxpaged.models.kv_cache import kv_bytes_per_block

    cfg = ModelConfig("LlamaForCausalLM", "llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128,
                      dtype="float32")
    config = EngineConfig(model="x", max_num_batched_tokens=16, max_num_seqs=256, gpu_memory_utilization=0.5)
    blocks = functools.partial(device_memory.kv_pool_blocks, config, cfg, 128, 16, np.float32)
    dev = types.SimpleNamespace(memory_stats=lambda: None, platform="cpu", local_hardware_id=3)
    monkeypatch.setattr(jax, "local_devices", lambda *a: [dev])
    assert blocks(0) > 0  # CPU: the default cap
    dev.platform = "gpu"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    asked = []

    def driver(ordinal):
        asked.append(ordinal)
        return 80 << 20, 100 << 20  # 80 MiB free of 100 MiB

    monkeypatch.setattr(device_memory, "cuda_mem_get_info", driver)
    head_bytes = 1 << 20
    reserve = head_bytes + 16 * (8 * 32 + 4 * 64) * 4
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.8")  # XLA's cap on the allocators
    expected = ((100 << 20) * 0.8 * 0.5 - (20 << 20) - reserve) // kv_bytes_per_block(cfg, config.block_size, np.float32)
    assert blocks(head_bytes) == expected
    assert asked == [3]  # the device's own CUDA ordinal

    def no_driver(ordinal):
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(device_memory, "cuda_mem_get_info", no_driver)
    with pytest.raises(ValueError, match="num_kv_blocks"):
        blocks(0)


def test_kv_pool_leaves_the_heads_measured_memory(model_dir, monkeypatch):
    """Start-up compiles the head programs first and keeps their measured memory free when it
    sizes the pool: the reserve covers at least the `full` head's f32 [T, V] logits (a bound
    from the shapes alone), and each head is traced once (compiled before the forward, reused
    after it: the hidden states' sharding matches)."""
    import jax

    from jaxpaged.engine import core, step_programs
    from jaxpaged.engine.sample.features import VARIANTS
    from jaxpaged.models.kv_cache import kv_bytes_per_block

    seen = {}
    sizing = core.kv_pool_blocks

    def fake_budget(*args, **kwargs):
        seen["head_bytes"] = args[-1]
        dev = jax.devices()[0]
        stats = {"bytes_limit": 64 << 20, "bytes_in_use": 0}
        monkeypatch.setattr(dev.__class__, "memory_stats", lambda d: stats, raising=False)
        try:
            return sizing(*args, **kwargs)
        finally:
            monkeypatch.undo()

    monkeypatch.setattr(core, "kv_pool_blocks", fake_budget)
    traces = step_programs.num_step_compiles()
    llm = LLM(model_dir, max_model_len=MAX_LEN, block_size=4, max_num_seqs=3, max_num_batched_tokens=24,
              gpu_memory_utilization=0.5)
    runner, cfg = llm.engine.runner, llm.engine.model_config
    forwards = len(runner.buckets) + len(runner.short_query_buckets)
    assert step_programs.num_step_compiles() - traces == forwards + len(runner.buckets) * len(VARIANTS)
    assert seen["head_bytes"] >= max(runner.buckets) * cfg.vocab_size * 4
    per_block = kv_bytes_per_block(cfg, 4, np.float32)
    reserve = seen["head_bytes"] + 24 * (8 * cfg.hidden_size + 4 * cfg.intermediate_size) * 4
    assert llm.engine.block_manager.num_total_blocks + 1 == int(((64 << 20) * 0.5 - reserve) // per_block)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
