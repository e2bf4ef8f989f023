"""`python -m jaxpaged.serve`: flags, and the README's first command on a fresh cache (subprocess + curl)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from _server import free_port, wait_healthy

from jaxpaged.serve.cli import engine_config, make_parser, read_chat_template
from jaxpaged.engine.demo import DEMO_DEFAULTS


def test_flags_map_to_engine_config(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXPAGED_API_KEY", "from-env")
    args = make_parser().parse_args(["--model", "m", "--dtype", "half", "--max-model-len", "99", "--block-size", "8",
                                     "--no-enable-prefix-caching", "-tp", "2", "--max-num-seqs", "3", "--seed", "5",
                                     "--gpu-memory-utilization", "0.5", "--max-num-batched-tokens", "32",
                                     "--token-buckets", "8,24", "--num-scheduler-steps", "4"])
    cfg = engine_config(args, "m", DEMO_DEFAULTS)
    assert (cfg.dtype, cfg.max_model_len, cfg.block_size, cfg.enable_prefix_caching) == ("float16", 99, 8, False)
    assert (cfg.tensor_parallel_size, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.seed) == (2, 3, 32, 5)
    assert cfg.gpu_memory_utilization == 0.5 and cfg.token_buckets == (8, 24) and cfg.num_scheduler_steps == 4
    with pytest.raises(SystemExit):  # a usage error, not a traceback
        make_parser().parse_args(["--token-buckets", "8,x"])
    defaults = make_parser().parse_args([])
    assert (defaults.port, defaults.api_key, defaults.enable_prefix_caching) == (8000, "from-env", True)
    assert engine_config(defaults, "m", DEMO_DEFAULTS).max_model_len == 256  # the demo's defaults apply
    assert make_parser().parse_args(["--api-key", "flag"]).api_key == "flag"
    multi = make_parser().parse_args(["--num-processes", "2", "--process-id", "1", "--coordinator-address", "h:1"])
    cfg = engine_config(multi, "m", {})
    assert (cfg.num_processes, cfg.process_id, cfg.coordinator_address) == (2, 1, "h:1")
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    assert read_chat_template(str(template)) == "{{ messages }}" and read_chat_template("{{ x }}") == "{{ x }}"


def test_several_processes_need_a_coordinator(capsys):
    """A multi-process server without the coordinator's address is a usage error, not a hang."""
    from jaxpaged.serve.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model", "m", "--num-processes", "2", "--process-id", "1"])
    assert exit_.value.code == 2 and "--coordinator-address" in capsys.readouterr().err


@contextlib.contextmanager
def demo_server(tmp_path):
    """`python -m jaxpaged.serve` on the demo model with a fresh cache, healthy; yields (port,
    process) and stops the process if it is still running at the end."""
    port = free_port()
    env = {**os.environ, "JAXPAGED_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jaxpaged.serve", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(port, [proc], (tmp_path / "server.log").read_text)
            yield port, proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)  # SIGTERM stops the server within 30 s, or the test fails
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    raise


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_readme_command_serves_demo_model_and_curl_answers(tmp_path):
    with demo_server(tmp_path) as (port, _):
        out = subprocess.run(["curl", "-s", f"http://127.0.0.1:{port}/v1/completions", "-H",
                              "Content-Type: application/json", "-d",
                              '{"model": "jaxpaged-demo", "prompt": "Hello", "max_tokens": 5}'],
                             capture_output=True, text=True, timeout=60, check=True)
        body = json.loads(out.stdout)
        assert body["object"] == "text_completion" and body["model"] == "jaxpaged-demo"
        assert body["usage"]["completion_tokens"] == 5 and isinstance(body["choices"][0]["text"], str)
        logs = (tmp_path / "server.log").read_text()
        for needle in ("demo model", "KV cache:", "tokens", "compiled token buckets", "loaded"):
            assert needle in logs
        assert (tmp_path / "cache" / "demo-llama" / "config.json").is_file()


def test_sigterm_exits_while_a_client_holds_a_stream_without_reading(tmp_path):
    """A client that opens a large stream and never reads it cannot keep the server alive: on
    SIGTERM the server waits a bounded time for open connections, then exits."""
    import signal
    import socket
    import time

    with demo_server(tmp_path) as (port, proc):
        body = json.dumps({"model": "jaxpaged-demo", "prompt": "Hello", "max_tokens": 200, "n": 128,
                           "logprobs": 5, "ignore_eos": True, "stream": True}).encode()
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # several MB of stream: it fills up
        stalled.connect(("127.0.0.1", port))
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(5)  # generating into the stream, whose send blocks once the buffers are full
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        proc.wait(timeout=45)
        assert time.monotonic() - start < 30, "shutdown took too long"
        stalled.close()
