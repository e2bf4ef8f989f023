"""`AsyncLLM` from a user's own asyncio program, in vLLM's shape: the engine core in a spawned
process, `async for out in llm.generate(...)`, `await llm.abort(...)`. The offline `LLM` on the
same model and shapes is the oracle."""
from __future__ import annotations

import asyncio
import time

from jaxpaged import LLM, AsyncLLM, EngineConfig, SamplingParams

ENGINE = dict(max_model_len=64, block_size=4, num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=16)
PROMPTS = [[5, 6, 7, 8, 9], list(range(40, 61)), "Hello world"]


def test_generate_matches_offline_and_abort_frees_blocks(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = [o.outputs[0] for o in LLM(model, **ENGINE).generate(PROMPTS, greedy, use_tqdm=False)]
    llm = AsyncLLM.from_engine_config(EngineConfig(model=model, **ENGINE))

    async def one(i: int, prompt) -> list:
        return [out async for out in llm.generate(prompt, greedy, f"req-{i}")]

    async def main() -> None:
        streams = await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))
        for outs, w in zip(streams, want):
            final = outs[-1]
            assert final.finished and all(not o.finished for o in outs[:-1])
            assert final.outputs[0].token_ids == w.token_ids and final.outputs[0].text == w.text
            assert [len(o.outputs[0].token_ids) for o in outs] == sorted({len(o.outputs[0].token_ids) for o in outs})

        long = llm.generate([7] * 10, SamplingParams(max_tokens=50, ignore_eos=True), "long")
        first = await long.__anext__()
        await llm.abort("long")
        rest = [out async for out in long]  # the stream ends, unfinished
        assert not first.finished and not any(o.finished for o in rest)
        assert len((rest or [first])[-1].outputs[0].token_ids) < 50
        deadline = time.monotonic() + 10
        while llm.stats.num_running or llm.stats.kv_usage:  # the core's stats after the abort
            assert time.monotonic() < deadline, llm.stats
            await asyncio.sleep(0.05)

    try:
        asyncio.run(main())
    finally:
        llm.shutdown()
    assert not llm._core_process.is_alive()
