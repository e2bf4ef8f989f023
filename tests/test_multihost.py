"""Two processes on 127.0.0.1 joined by jax.distributed (CPU, gloo), one device each, tensor
parallel over both: the same tokens as one process."""
from __future__ import annotations

import json
import subprocess
import sys

from _server import free_port, wait_healthy

from jaxpaged import LLM, SamplingParams

ENGINE = dict(max_model_len=64, block_size=4, num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=16)
PROMPTS = [[5, 6, 7, 8, 9], list(range(40, 61))]
WORKER = """
import json, sys
from jaxpaged import LLM, SamplingParams
model, port, pid, prompts, engine = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), json.loads(sys.argv[5])
llm = LLM(model, tensor_parallel_size=2, coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid, **engine)
outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]))
"""


def test_two_processes_match_one(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    port = str(free_port())
    args = [model, port, None, json.dumps(PROMPTS), json.dumps(ENGINE)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, *args[:2], str(pid), *args[3:]],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    tokens = [json.loads(next(line for line in log.splitlines() if line.startswith("TOKENS"))[7:]) for log in logs]
    want = LLM(model, **ENGINE).generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                         use_tqdm=False)
    assert tokens[0] == tokens[1] == [o.outputs[0].token_ids for o in want]


SERVE_ENGINE = ["--max-model-len", "64", "--block-size", "4", "--num-kv-blocks", "64", "--max-num-seqs", "4",
                "--max-num-batched-tokens", "16", "--no-enable-prefix-caching", "--tensor-parallel-size", "2"]


def test_server_across_two_processes(tiny_model_dir, tmp_path):
    """`jaxpaged.serve` on two processes: process 0 serves HTTP and sends each step's new and
    aborted requests to process 1, which mirrors them (the mesh spans both). Completions
    (two at once, a streamed one dropped mid-way, one after an idle spell) match one
    process's tokens, and both processes exit cleanly when the server stops."""
    import os
    import signal
    import threading
    import time

    import openai

    model = str(tiny_model_dir("llama"))
    coord, port = free_port(), free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    logs = [open(tmp_path / f"p{pid}.log", "w+") for pid in (0, 1)]
    procs = [subprocess.Popen([sys.executable, "-m", "jaxpaged.serve", "--model", model, "--host", "127.0.0.1",
                               "--port", str(port), *SERVE_ENGINE, "--num-processes", "2", "--process-id", str(pid),
                               "--coordinator-address", f"127.0.0.1:{coord}"],
                              env=env, stdout=logs[pid], stderr=subprocess.STDOUT) for pid in (0, 1)]

    def show() -> str:
        return "\n".join(open(tmp_path / f"p{pid}.log").read()[-3000:] for pid in (0, 1))

    try:
        wait_healthy(port, procs, show, timeout=240)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
        name = client.models.list().data[0].id
        prompts = [[5, 6, 7, 8, 9], list(range(40, 61)), [3, 1, 4, 1, 5, 9, 2, 6]]
        greedy = dict(max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        got: dict[int, str] = {}

        def complete(i: int) -> None:
            got[i] = client.completions.create(model=name, prompt=prompts[i], **greedy).choices[0].text

        # a streamed request dropped after its first chunk: process 0 aborts it
        stream = client.completions.create(model=name, prompt=[7] * 30, max_tokens=20, temperature=0, stream=True)
        next(iter(stream))
        stream.close()
        threads = [threading.Thread(target=complete, args=(i,)) for i in (0, 1)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        time.sleep(2)  # idle: process 1 waits for the next message
        complete(2)
    finally:
        procs[0].send_signal(signal.SIGINT)
        codes = [p.wait(timeout=60) for p in procs]
        [f.close() for f in logs]
    assert codes == [-signal.SIGINT, 0], show()  # process 0: a clean exit, uvicorn re-raises the signal
    assert "aborted request" in open(tmp_path / "p0.log").read()  # the dropped stream (mirrored on process 1)
    want = LLM(model, **ENGINE).generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                         use_tqdm=False)
    assert [got[i] for i in range(3)] == [o.outputs[0].text for o in want]
