"""`python -m jaxpaged.serve`: flags, and the README's first command on a fresh cache (subprocess + curl)."""
from __future__ import annotations

import contextlib
import json
import re
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

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
    cfg = engine_config(args, "m", DEMO_DEFAULTS, resolve=False)
    assert (cfg.dtype, cfg.max_model_len, cfg.block_size, cfg.enable_prefix_caching) == ("float16", 99, 8, False)
    assert (cfg.tensor_parallel_size, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.seed) == (2, 3, 32, 5)
    assert cfg.gpu_memory_utilization == 0.5 and cfg.token_buckets == (8, 24) and cfg.num_scheduler_steps == 4
    with pytest.raises(SystemExit):  # a usage error, not a traceback
        make_parser().parse_args(["--token-buckets", "8,x"])
    defaults = make_parser().parse_args([])
    assert (defaults.port, defaults.api_key, defaults.enable_prefix_caching) == (8000, "from-env", True)
    assert engine_config(defaults, "m", DEMO_DEFAULTS, resolve=False).max_model_len == 256  # the demo's defaults apply
    assert make_parser().parse_args(["--api-key", "flag"]).api_key == "flag"
    assert not defaults.trust_request_chat_template
    assert make_parser().parse_args(["--trust-request-chat-template"]).trust_request_chat_template
    multi = make_parser().parse_args(["--num-processes", "2", "--process-id", "1", "--coordinator-address", "h:1"])
    cfg = engine_config(multi, "m", {}, resolve=False)
    assert (cfg.num_processes, cfg.process_id, cfg.coordinator_address) == (2, 1, "h:1")
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    assert read_chat_template(str(template)) == "{{ messages }}" and read_chat_template("{{ x }}") == "{{ x }}"


def fake_hub_cache(cache: Path, repo: str, src: Path) -> Path:
    """`src` as snapshot `c0ffee` of `repo` in a Hugging Face cache at `cache`, laid out as
    huggingface_hub lays it out (refs/main names the snapshot)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / "c0ffee"
    shutil.copytree(src, snapshot)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("c0ffee")
    return snapshot


def test_hub_id_resolves_from_the_local_cache_offline(tiny_model_dir, tmp_path, monkeypatch):
    """A hub id is found in the HF cache with HF_HUB_OFFLINE set; one missing there is a
    one-line error naming it; a local directory is taken as is."""
    from huggingface_hub import constants

    from jaxpaged.engine.hub import resolve_model

    cache = tmp_path / "hub"
    snapshot = fake_hub_cache(cache, "acme/tiny-llama", tiny_model_dir("llama"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert Path(resolve_model("acme/tiny-llama", download_dir=str(cache))) == snapshot
    assert resolve_model(str(snapshot)) == str(snapshot)
    with pytest.raises(ValueError, match="applies to hub ids only"):
        resolve_model(str(snapshot), revision="v1")
    with pytest.raises(ValueError, match="'acme/missing' is not a local directory and not in the Hugging Face cache"):
        resolve_model("acme/missing", download_dir=str(cache))


def test_vllm_cpu_tutorial_line_with_a_hub_id_offline(tiny_model_dir, tmp_path):
    """vLLM's CPU tutorial line (`--model M --trust-remote-code --device cpu --dtype bfloat16
    --tokenizer-mode auto`, no engine sizes) with M a hub id in an offline HF cache, and its
    request; the engine core takes the CPU's small defaults (the tiny model's
    3 buckets x (head variants + 1) programs, as with small sizes given) and says so; the flags that change nothing here are logged as such."""
    import httpx

    cache = tmp_path / "hub"
    fake_hub_cache(cache, "acme/tiny-llama", tiny_model_dir("llama"))
    port = free_port()
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "JAXPAGED_CACHE": str(tmp_path / "jp")}
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jaxpaged.serve", "--model", "acme/tiny-llama",
                                 "--trust-remote-code", "--device", "cpu", "--dtype", "bfloat16", "--tokenizer-mode",
                                 "auto", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            wait_healthy(port, [proc], log_path.read_text)
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
                "model": "acme/tiny-llama", "prompt": "Explique a importância da IA.", "max_tokens": 50,
                "temperature": 0.7})
            body = r.json()
            assert r.status_code == 200 and body["model"] == "acme/tiny-llama", body
            assert 1 <= body["usage"]["completion_tokens"] <= 50
            assert body["choices"][0]["finish_reason"] in ("stop", "length")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    logs = log_path.read_text()
    assert "--trust-remote-code changes nothing here" in logs and "non-default args" in logs
    # the tiny model's context is 256: the CPU's sizes below it; per bucket one forward and a head
    # per sampling variant compiled
    from jaxpaged.engine.sample.features import VARIANTS
    n = 3 * (len(VARIANTS) + 1)
    assert ("CPU defaults: max_model_len=256, max_num_seqs=16, max_num_batched_tokens=256, "
            "token_buckets=(16, 64, 256)") in logs
    assert "'buckets': [16, 64, 256]" in logs and f"warm-up: compiled {n}/{n} programs" in logs


def test_jaxpaged_serve_command_and_positional_model(capsys):
    """`jaxpaged serve [MODEL]` as `vllm serve`; MODEL and a different --model are a usage error."""
    from jaxpaged.serve.cli import console_main, main

    with pytest.raises(SystemExit) as exit_:
        console_main(["serve", "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: jaxpaged serve [-h] [--model MODEL]")
    with pytest.raises(SystemExit) as exit_:
        console_main(["bogus"])
    assert exit_.value.code == 2 and "usage: jaxpaged serve" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["a", "--model", "b"])
    assert exit_.value.code == 2 and "differ" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["m", "--tokenizer-mode", "slow"])
    assert exit_.value.code == 2 and "--tokenizer-mode='slow' is not supported" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["/nonexistent/model-dir"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "'/nonexistent/model-dir' is not a local directory" in err


def test_several_processes_need_a_coordinator(capsys):
    """A multi-process server without the coordinator's address is a usage error, not a hang."""
    from jaxpaged.serve.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model", "m", "--num-processes", "2", "--process-id", "1"])
    assert exit_.value.code == 2 and "--coordinator-address" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """One JAXPAGED_CACHE for this module's demo servers: the README test's cold start (its own
    cache, as a new user's) fills it, and the others load its compiled programs (~4 s instead
    of ~13 s each; the first compiles if that test did not run)."""
    return tmp_path_factory.mktemp("demo-cache")


@contextlib.contextmanager
def demo_server(tmp_path, cache, *flags: str):
    """`python -m jaxpaged.serve` on the demo model with JAXPAGED_CACHE `cache`, healthy; yields
    (port, process) and stops the process if it is still running at the end."""
    port = free_port()
    env = {**os.environ, "JAXPAGED_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jaxpaged.serve", "--host", "127.0.0.1", "--port", str(port),
                                 *flags], env=env, stdout=log, stderr=subprocess.STDOUT)
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
def test_readme_command_serves_demo_model_and_curl_answers(tmp_path, demo_cache):
    with demo_server(tmp_path, tmp_path / "cache") as (port, _):  # a new user's cold start
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
        # warm-up progress, every program counted; the compiled programs kept for the next start
        progress = re.findall(r"warm-up: compiled (\d+)/(\d+) programs", logs)
        assert progress and [int(d) for d, _ in progress] == list(range(1, int(progress[0][1]) + 1))
        assert len(list((tmp_path / "cache" / "xla").iterdir())) >= int(progress[0][1])
    shutil.copytree(tmp_path / "cache", demo_cache, dirs_exist_ok=True)  # the module's later servers start warm


def children(pid: int) -> dict[int, str]:
    """The child processes of `pid`: {pid: command line}."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            pass
    return out


def imports_jax(pid: int) -> bool:
    return "jaxlib" in Path(f"/proc/{pid}/maps").read_text()


def processes(server_pid: int) -> tuple[int, list[int]]:
    """The engine core's pid and the spawned API servers' pids (the resource tracker aside)."""
    spawned = [p for p, cmd in children(server_pid).items() if "spawn_main" in cmd]
    cores = [p for p in spawned if imports_jax(p)]
    assert len(cores) == 1, children(server_pid)
    return cores[0], [p for p in spawned if p != cores[0]]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


STREAM = {"model": "jaxpaged-demo", "prompt": "Hello", "max_tokens": 240, "ignore_eos": True, "stream": True}


def read_events(lines) -> list[dict | str]:
    """The SSE events of a stream's remaining `lines`: JSON bodies, then "[DONE]"."""
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]" for line in lines
            if line.startswith("data: ")]


def test_two_api_servers_serve_256_concurrent_streams_without_jax(tmp_path, demo_cache):
    """--api-server-count 2: two API server processes on one port, one engine core. Only the
    core maps JAX's library. 256 concurrent greedy streams give the texts of one batched
    request, and both API servers do work. The tool and reasoning parser flags reach both."""
    import asyncio

    import httpx

    with demo_server(tmp_path, demo_cache, "--api-server-count", "2", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                     "--reasoning-parser", "qwen3") as (port, proc):
        core, apis = processes(proc.pid)
        assert len(apis) == 2 and not any(imports_jax(p) for p in (proc.pid, *apis))
        url = f"http://127.0.0.1:{port}/v1/completions"
        prompts = [f"Hello {i}" for i in range(256)]
        kw = {"model": "jaxpaged-demo", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        batch = httpx.post(url, json={**kw, "prompt": prompts}, timeout=120).json()
        want = [c["text"] for c in sorted(batch["choices"], key=lambda c: c["index"])]
        cpu = [cpu_seconds(p) for p in apis]

        async def one(client, prompt) -> str:
            async with client.stream("POST", url, json={**kw, "prompt": prompt, "stream": True}) as r:
                assert r.status_code == 200
                events = [e async for e in _aread_events(r)]
            assert events[-1] == "[DONE]"
            return "".join(e["choices"][0]["text"] for e in events[:-1])

        async def run_all() -> list[str]:
            limits = httpx.Limits(max_connections=256)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                return await asyncio.gather(*(one(client, p) for p in prompts))

        assert asyncio.run(run_all()) == want
        used = [cpu_seconds(p) - c for p, c in zip(apis, cpu)]
        assert all(u > 0.05 for u in used), f"an API server did no work: {used} CPU s"
        chat = {"model": "jaxpaged-demo", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f"}}]}
        for _ in range(6):  # tool_choice "auto" is served (a 400 without the flags); reasoning_content is there
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat, timeout=60)
            assert r.status_code == 200 and "reasoning_content" in r.json()["choices"][0]["message"], r.text


async def _aread_events(r):
    async for line in r.aiter_lines():
        if line.startswith("data: "):
            yield json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"


def test_engine_core_killed_mid_stream(tmp_path, demo_cache):
    """SIGKILL the engine core while a stream runs: the stream ends with a 503 error event,
    /health and new requests answer 503, and the server exits non-zero (for its supervisor)."""
    import signal

    import httpx

    with demo_server(tmp_path, demo_cache) as (port, proc):
        core, _ = processes(proc.pid)
        assert not imports_jax(proc.pid)  # one API server: the command's own process, without JAX
        base = f"http://127.0.0.1:{port}"
        with httpx.stream("POST", base + "/v1/completions", json={**STREAM, "n": 8}, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"]
            os.kill(core, signal.SIGKILL)
            events = read_events(lines)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 503, events[-3:]
        assert httpx.get(base + "/health").status_code == 503
        r = httpx.post(base + "/v1/completions", json={"model": "jaxpaged-demo", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == 503
        assert proc.wait(timeout=30) == 1


@pytest.mark.parametrize("resume_after, timeout", [(1.0, 20), (None, 4)])
def test_sigterm_drains_then_ends_open_streams_with_an_error(tmp_path, demo_cache, resume_after, timeout):
    """SIGTERM while 4 streams run and the engine core is paused (SIGSTOP): resumed 1 s later,
    the streams complete (drained) within --shutdown-timeout 20 (a slow CPU needs more than
    3 s for them); never resumed within --shutdown-timeout 4, each ends with a 503 "shutting
    down" error event after 4 s. Then the server exits."""
    import signal
    import threading

    import httpx

    with demo_server(tmp_path, demo_cache, "--shutdown-timeout", str(timeout)) as (port, proc):
        core, _ = processes(proc.pid)
        url = f"http://127.0.0.1:{port}/v1/completions"
        results: dict[int, list] = {}
        started = threading.Barrier(5)

        def stream(i: int) -> None:
            with httpx.stream("POST", url, json={**STREAM, "n": 8}, timeout=60) as r:
                lines = r.iter_lines()
                first = [next(line for line in lines if line.startswith("data: "))]
                started.wait()
                results[i] = read_events(first + list(lines))

        streams = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in streams:
            t.start()
        started.wait(timeout=60)
        os.kill(core, signal.SIGSTOP)
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        if resume_after is not None:
            time.sleep(resume_after)
            os.kill(core, signal.SIGCONT)
        for t in streams:
            t.join(timeout=30)
        ended = time.monotonic() - start
        os.kill(core, signal.SIGCONT)
        assert len(results) == 4 and all(events[-1] == "[DONE]" for events in results.values())
        for events in results.values():
            if resume_after is None:
                assert events[-2]["error"]["code"] == 503 and "shutting down" in events[-2]["error"]["message"]
            else:
                finished = {c["index"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]}
                assert finished == set(range(8))
        assert (timeout <= ended < timeout + 3) if resume_after is None else ended < timeout, ended
        assert proc.wait(timeout=30) == -signal.SIGTERM  # a clean exit: uvicorn re-raises the signal


def test_sigterm_exits_while_a_client_holds_a_stream_without_reading(tmp_path, demo_cache):
    """A client that opens a large stream and never reads it cannot keep the server alive: on
    SIGTERM the server waits a bounded time for open connections, then exits."""
    import signal
    import socket
    import time

    with demo_server(tmp_path, demo_cache, "--shutdown-timeout", "4") as (port, proc):
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
        assert time.monotonic() - start < 15, "shutdown took too long"
        stalled.close()
