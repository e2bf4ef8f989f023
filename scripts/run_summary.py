"""A short table of benchmark results: the `--json` files of benchmark_throughput.py,
benchmark_latency.py and benchmark_serving.py (files, or folders searched for *.json).

    python scripts/run_summary.py RESULTS_DIR_OR_JSON [...]

One row per throughput run (output tok/s, HF's and the ratio when `--compare hf` ran, the
fraction of the roofline floor, device busy, start-up), per latency figure (ms and x the
weight-read floor) and per serving rate (throughput, TTFT / TPOT / ITL medians and TTFT p99).
scripts/run_h200_suite.sh prints it last.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def kind_of(d) -> str | None:
    if not isinstance(d, dict):
        return None
    if d.get("kind") == "serving":
        return "serving"
    if isinstance(d.get("jaxpaged"), dict) and "output_tok_per_s" in d["jaxpaged"]:
        return "throughput"
    if isinstance(d.get("seconds"), dict) and "floor_s" in d:
        return "latency"
    return None


def throughput_rows(name: str, d: dict) -> list[list[str]]:
    a, j, hf = d.get("args", {}), d["jaxpaged"], d.get("hf")
    setup = [a.get("workload", "?"), a.get("model_shape") or Path(str(a.get("model"))).name]
    if a.get("tensor_parallel_size", 1) > 1:
        setup.append(f"tp={a['tensor_parallel_size']}")
    if a.get("max_num_batched_tokens", 2048) != 2048:
        setup.append(f"budget {a['max_num_batched_tokens']}")
    if a.get("num_scheduler_steps", 1) > 1:
        setup.append(f"K={a['num_scheduler_steps']}")
    notes = [f"{100 * j['roofline_fraction']:.0f}% of roofline"]
    if j.get("device_busy"):
        notes.append(f"busy {100 * j['device_busy']:.0f}%")
    notes.append(f"start-up {j['startup_s']:.0f} s")
    rows = [[name, ", ".join(setup), f"{j['output_tok_per_s']:,.0f} out tok/s", "; ".join(notes)]]
    if hf:
        rows.append([name, "HF generate, static batches", f"{hf['output_tok_per_s']:,.0f} out tok/s",
                     f"jaxpaged {hf['speedup']:.1f}x"])
    return rows


def latency_rows(name: str, d: dict) -> list[list[str]]:
    floor = d["floor_s"]
    return [[name, k, f"{1e3 * v:.2f} ms", f"{v / floor:.2f}x the floor ({1e3 * floor:.2f} ms)" if "ITL" in k else ""]
            for k, v in d["seconds"].items() if not k.startswith(" ")]  # the indented keys are device times


def serving_rows(name: str, d: dict) -> list[list[str]]:
    rows = []
    for r in d["results"]:
        ms = {k: r[f"{k}_ms"] for k in ("ttft", "tpot", "itl")}
        rate = "inf" if str(r["request_rate"]) == "inf" else f"{float(r['request_rate']):g}"
        rows.append([name, f"rate {rate}/s, {r['completed']}/{r['completed'] + r['failed']} done",
                     f"{r['output_throughput']:,.0f} out tok/s",
                     f"TTFT {ms['ttft']['median']:.1f} (p99 {ms['ttft']['p99']:.1f}), TPOT {ms['tpot']['median']:.1f}, "
                     f"ITL {ms['itl']['median']:.1f} ms"])
    return rows


def summarize(paths: list[Path]) -> list[list[str]]:
    files = []
    for p in paths:
        files += sorted(p.rglob("*.json")) if p.is_dir() else [p]
    rows = []
    for f in files:
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        kind = kind_of(d)
        if kind:
            rows += {"throughput": throughput_rows, "latency": latency_rows, "serving": serving_rows}[kind](f.stem, d)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="result JSON files or folders of them")
    rows = summarize(ap.parse_args().paths)
    if not rows:
        print("no benchmark results")
        return
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip())


if __name__ == "__main__":
    main()
