"""docs/architecture.md draws a request's route: the jaxpaged files whose Python runs while the
server answers a completion (after start-up) are exactly the host files that drawing names."""
from __future__ import annotations

import asyncio
import re
import sys
import threading
from pathlib import Path

import httpx

import jaxpaged
from jaxpaged.engine.config import EngineConfig
from jaxpaged.engine.llm_engine import LLMEngine
from jaxpaged.serve.app import build_app
from jaxpaged.serve.async_engine import AsyncEngine

ROOT = Path(jaxpaged.__file__).parent
DOC = Path(__file__).parent.parent / "docs" / "architecture.md"
COMPILED = {"engine/step_programs.py", "models/llama.py", "models/layers.py", "kernels/paged_attention_gpu.py",
            "kernels/paged_attention.py"}  # traced at start-up: the step's compiled programs


def drawn_files() -> set[str]:
    """The files named (with their folder) in the drawing's code block."""
    block = DOC.read_text().split("## A request's route")[1].split("```")[1]
    return set(re.findall(r"\b((?:serve|engine|models|kernels)/[\w/]+\.py)", block))


def test_completion_route_runs_the_drawn_files(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir("llama")), max_model_len=128, block_size=4,
                                    num_kv_blocks=256, max_num_seqs=8, max_num_batched_tokens=64))
    app = build_app(AsyncEngine(engine), ["tiny"], "tiny")
    seen, on = set(), [False]

    def record(frame, event, arg):
        if on[0] and frame.f_code.co_filename.startswith(str(ROOT)):
            seen.add(Path(frame.f_code.co_filename).relative_to(ROOT).as_posix())

    async def run():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
                await client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
                on[0] = True
                for stream in (False, True):
                    r = await client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello world",
                                                                   "max_tokens": 5, "stream": stream})
                    assert r.status_code == 200, r.text
                on[0] = False

    old = sys.getprofile()
    sys.setprofile(record)
    threading.setprofile(record)  # the engine and dispatch threads start inside `run`
    try:
        asyncio.run(run())
    finally:
        sys.setprofile(old)
        threading.setprofile(None)
    assert seen == drawn_files() - COMPILED, (sorted(seen), sorted(drawn_files()))
