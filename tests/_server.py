"""Helpers for the tests that start `jaxpaged.serve` as a subprocess."""
from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, procs: list[subprocess.Popen], logs: Callable[[], str], timeout: float = 180) -> None:
    """Poll /health until it answers 200; fail with `logs()` if a process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, logs()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
