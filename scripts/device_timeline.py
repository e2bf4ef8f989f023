"""Where a traced window's device time goes: busy and idle per device stream, the longest idle
gaps with the kernels on either side, and the host's dispatches of the step programs, from a
`jax.profiler.trace(dir, create_perfetto_trace=True)` capture.

    python scripts/device_timeline.py TRACE_DIR [--gaps 8]

A gap is time where no kernel or copy runs on any of the device's streams. The host rows
(`PjitFunction(...)` on each Python thread) show when each program was dispatched, so a gap
that starts after a kernel and ends at a dispatch is the host's.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path


def load_events(trace_dir: str) -> tuple[list[dict], dict[int, str], dict[tuple[int, int], str]]:
    """The newest perfetto capture under `trace_dir`: its complete events, process names by pid
    and thread names by (pid, tid)."""
    path = max(Path(trace_dir).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[e["pid"], e["tid"]] = e["args"]["name"]
    return [e for e in events if e.get("ph") == "X"], procs, threads


def device_gaps(events: list[dict], procs: dict[int, str]) -> tuple[float, float, list[tuple[float, float, str, str]]]:
    """(busy us, window us, gaps as (start us, length us, kernel before, kernel after)) over the
    union of every device stream's events."""
    dev = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
                 if procs.get(e["pid"], "").startswith("/device:"))
    if not dev:
        return 0.0, 0.0, []
    busy, gaps = 0.0, []
    start, end, last = dev[0][0], dev[0][1], dev[0][2]
    for s, e, name in dev[1:]:
        if s > end:
            busy += end - start
            gaps.append((end, s - end, last, name))
            start = s
        if e >= end:
            end, last = e, name
    busy += end - start
    return busy, end - dev[0][0], gaps


def host_dispatches(events: list[dict], procs: dict[int, str], threads: dict[tuple[int, int], str]) -> dict:
    """Per (thread, program) the count and mean duration of its jit dispatches on the host."""
    out = collections.defaultdict(list)
    for e in events:
        if procs.get(e["pid"], "").startswith("/host") and e["name"].startswith("PjitFunction("):
            out[threads.get((e["pid"], e["tid"]), str(e["tid"])), e["name"]].append(e.get("dur", 0))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace_dir")
    ap.add_argument("--gaps", type=int, default=8, help="how many of the longest gaps to list")
    args = ap.parse_args(argv)
    events, procs, threads = load_events(args.trace_dir)
    busy, window, gaps = device_gaps(events, procs)
    if not window:
        print(f"no device events in the capture (processes: {sorted(set(procs.values()))})")
        return
    print(f"device busy {busy / 1e3:.2f} of {window / 1e3:.2f} ms ({busy / window:.1%}); "
          f"{len(gaps)} gaps, {sum(g[1] for g in gaps) / 1e3:.2f} ms idle")
    for s, length, before, after in sorted(gaps, key=lambda g: -g[1])[:args.gaps]:
        print(f"  gap {length:8.1f} us at {(s - events[0]['ts']) / 1e3:8.2f} ms: after {before[:50]!r}, before {after[:50]!r}")
    for (thread, name), durs in sorted(host_dispatches(events, procs, threads).items()):
        print(f"  host {thread[:24]:24s} {name[:50]:50s} x{len(durs):4d} mean {sum(durs) / len(durs):8.1f} us")


if __name__ == "__main__":
    main()
