"""docs/architecture.md draws a request's route: the jaxpaged files whose Python runs while the
server answers a completion (after start-up) are exactly the host files that drawing names,
and the route has at most 12 stations (its numbered files)."""
from __future__ import annotations

import asyncio
import re
import sys
import threading
from pathlib import Path

import httpx

import jaxpaged
from jaxpaged.engine.async_llm import AsyncLLM
from jaxpaged.engine.config import EngineConfig
from jaxpaged.engine.core import EngineCore
from jaxpaged.engine.core_proc import start_core_thread, stop_core_thread
from jaxpaged.serve.app import build_app

ROOT = Path(jaxpaged.__file__).parent
DOC = Path(__file__).parent.parent / "docs" / "architecture.md"
COMPILED = {"engine/step_programs.py", "models/llama.py", "models/layers.py", "kernels/paged_attention_gpu.py",
            "kernels/paged_attention.py"}  # traced at start-up: the step's compiled programs


def drawing() -> str:
    return DOC.read_text().split("## A request's route")[1].split("```")[1]


def drawn_files() -> set[str]:
    """The files named (with their folder) in the drawing's code block."""
    return set(re.findall(r"\b((?:serve|engine|models|kernels)/[\w/]+\.py)", drawing()))


def test_the_route_has_at_most_12_stations():
    stations = dict(re.findall(r"^\s*(\d+) ((?:serve|engine|models|kernels)/[\w/]+\.py)", drawing(), re.M))
    assert sorted(map(int, stations)) == list(range(1, len(stations) + 1)) and len(stations) <= 12, stations


def test_completion_route_runs_the_drawn_files(tiny_model_dir):
    core = EngineCore(EngineConfig(model=str(tiny_model_dir("llama")), max_model_len=128, block_size=4,
                                   num_kv_blocks=256, max_num_seqs=8, max_num_batched_tokens=64))
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
    threading.setprofile(record)  # the engine core's, dispatch and tokenizer threads start after this
    address, thread = start_core_thread(core)
    app = build_app(AsyncLLM(address, core.info), ["tiny"], "tiny", max_request_body_size=1 << 20)  # as the CLI
    sys.setprofile(record)
    try:
        asyncio.run(run())
    finally:
        sys.setprofile(old)
        threading.setprofile(None)
        stop_core_thread(address, thread)
    assert seen == drawn_files() - COMPILED, (sorted(seen), sorted(drawn_files()))
