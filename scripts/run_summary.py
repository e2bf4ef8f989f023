"""A short table of benchmark results: the `--json` files of benchmark_throughput.py,
benchmark_latency.py and benchmark_serving.py (files, or folders searched for *.json).

    python scripts/run_summary.py RESULTS_DIR_OR_JSON [...]

One row per throughput run (output tok/s, HF's and the ratio when `--compare hf` ran, the
fraction of the roofline floor, device busy, start-up), per latency figure (ms and x the
weight-read floor) and per serving rate (throughput, TTFT / TPOT / ITL medians and TTFT p99).
scripts/run_h200_suite.sh prints it last. `--ab`: the suite's `ab` part instead, this tree
against the base revision per measure (files `ab-<measure>-<base|this>-<round>.json`).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
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
        f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731 - none completed
        rows.append([name, f"rate {rate}/s, {r['completed']}/{r['completed'] + r['failed']} done, "
                     f"{r.get('request_throughput', 0):.1f} req/s", f"{r['output_throughput']:,.0f} out tok/s",
                     f"TTFT {f(ms['ttft']['median'])} (p99 {f(ms['ttft']['p99'])}), TPOT {f(ms['tpot']['median'])}, "
                     f"ITL {f(ms['itl']['median'])} (p99 {f(ms['itl']['p99'])}) ms"])
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


AB_MEASURES = {  # measure -> (the runs' workload, its value in a run's JSON or None, higher is better)
    "mixed tok/s": ("mixed", lambda d: d["jaxpaged"]["output_tok_per_s"], True),
    "cold start s (round 1)": ("mixed", lambda d: d["jaxpaged"]["startup_s"], False),
    "fixed tok/s": ("fixed", lambda d: d["jaxpaged"]["output_tok_per_s"], True),
    "fixed device s": ("fixed", lambda d: d["jaxpaged"].get("device_s"), False),
    "batch-1 ITL ms": ("latency", lambda d: _ms(d["seconds"].get("decode ITL, batch 1")), False),
    "TTFT 512 ms": ("latency", lambda d: _ms(d["seconds"].get("TTFT, prompt 512")), False),
}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1e3 * seconds


def ab_rows(paths: list[Path]) -> list[list[str]]:
    """Per measure: the base revision's and this tree's values (median over rounds), the change."""
    runs: dict[tuple[str, str], list[tuple[int, dict]]] = {}
    for p in paths:
        for f in (sorted(p.rglob("ab-*.json")) if p.is_dir() else [p]):
            m = re.fullmatch(r"ab-(\w+)-(base|this)-(\d+)", f.stem)
            if m:
                runs.setdefault((m[1], m[2]), []).append((int(m[3]), json.loads(f.read_text())))
    rows = []
    for name, (workload, value, higher) in AB_MEASURES.items():
        vals = {}
        for v in ("base", "this"):
            got = [(r, value(d)) for r, d in runs.get((workload, v), []) if "round 1" not in name or r == 1]
            vals[v] = [x for _, x in sorted(got) if x is not None]
        if not (vals["base"] and vals["this"]):
            continue
        base, this = statistics.median(vals["base"]), statistics.median(vals["this"])
        change = 100 * (this / base - 1) * (1 if higher else -1)
        rows.append([name, " / ".join(f"{x:,.2f}" for x in vals["base"]), " / ".join(f"{x:,.2f}" for x in vals["this"]),
                     f"{change:+.1f}% ({'better' if change >= 0 else 'worse'})"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="result JSON files or folders of them")
    ap.add_argument("--ab", action="store_true", help="compare the suite's `ab` runs (base revision vs this tree)")
    args = ap.parse_args()
    rows = ab_rows(args.paths) if args.ab else summarize(args.paths)
    if args.ab and rows:
        rows.insert(0, ["measure", "base (per round)", "this tree (per round)", "this vs base"])
    if not rows:
        print("no benchmark results")
        return
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip())


if __name__ == "__main__":
    main()
