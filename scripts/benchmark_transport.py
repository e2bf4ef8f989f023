"""The engine core's per-step message cost: msgpack encode, ZeroMQ over IPC, decode.

    python scripts/benchmark_transport.py [--rows 1,64,256] [--steps 2000]

For each batch size, one step's `EngineCoreOutputs` (one new token per row, as in a decode
step; with and without top-5 logprobs) goes from a ROUTER socket to a DEALER socket in another
process, as from the engine core to an API server. Prints microseconds per step: encoding on
the core's side, the whole trip (encode, send, receive, decode), and the message size. No GPU
and no JAX needed.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

import zmq

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from jaxpaged.engine import messages as m  # noqa: E402
from jaxpaged.engine.core_proc import new_address  # noqa: E402


def step_outputs(rows: int, logprobs: bool) -> m.EngineCoreOutputs:
    outs = []
    for i in range(rows):
        o = m.EngineCoreOutput(f"cmpl-{i:032x}-0", 0, [1000 + i], [-1.25], num_cached_tokens=16,
                               first_scheduled_time=time.monotonic())
        if logprobs:
            o.ranks, o.top_ids, o.top_logprobs = [1], [[1000 + i, 7, 8, 9, 10]], [[-1.25, -2.0, -3.0, -4.0, -5.0]]
        outs.append(o)
    return m.EngineCoreOutputs(outs, m.SchedulerStats(rows, 0, 0.5, 10, 20, 0, 30, 40))


def client(address: str, steps: int) -> None:
    """Receive and decode `steps` messages, answering each (a ping-pong keeps one in flight)."""
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.connect(address)
        sock.send(m.encode([m.HELLO]))
        for _ in range(steps):
            m.outputs_from_message(m.decode(sock.recv()))
            sock.send(b"ok")


def measure(rows: int, logprobs: bool, steps: int) -> tuple[float, float, int]:
    outs = step_outputs(rows, logprobs)
    t0 = time.perf_counter()
    for _ in range(steps):
        data = m.outputs_message(outs)
    encode_us = (time.perf_counter() - t0) / steps * 1e6
    address = new_address()
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as sock:
        sock.bind(address)
        proc = multiprocessing.get_context("spawn").Process(target=client, args=(address, steps))
        proc.start()
        peer, _ = sock.recv_multipart()
        t0 = time.perf_counter()
        for _ in range(steps):
            sock.send_multipart([peer, m.outputs_message(outs)])
            sock.recv_multipart()
        trip_us = (time.perf_counter() - t0) / steps * 1e6
        proc.join()
    return encode_us, trip_us, len(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,64,256", help="comma-separated rows (requests) per step")
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args()
    print(f"{'rows':>5} {'logprobs':>8} {'encode us':>10} {'round trip us':>14} {'bytes':>8}")
    for rows in map(int, args.rows.split(",")):
        for logprobs in (False, True):
            encode_us, trip_us, size = measure(rows, logprobs, args.steps)
            print(f"{rows:>5} {'top-5' if logprobs else '-':>8} {encode_us:>10.1f} {trip_us:>14.1f} {size:>8}")


if __name__ == "__main__":
    main()
