"""Two processes on 127.0.0.1 joined by jax.distributed (CPU, gloo), one device each, tensor
parallel over both: the same tokens as one process."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
