"""Online serving benchmark, like `vllm bench serve`: Poisson arrivals against a running server.

    python -m jaxpaged.serve --model DIR --no-enable-prefix-caching --port 8000 &
    python scripts/benchmark_serving.py --request-rates 1,4,16,inf --workload mixed \
        --num-prompts 200 --json serving.json --plot serving.png

For each rate in --request-rates (requests/s; `inf` sends them all at once) the client sends
--num-prompts streaming `POST /v1/completions` requests with Poisson arrivals (gamma when
--burstiness != 1, as vLLM), waits for them all, then goes on to the next rate. Prompts are
token-id lists of random ids below the model's vocab; lengths as scripts/benchmark_throughput.py
(`fixed`: --input-len in, --output-len out; `mixed`: both uniform in [--min-len, --max-len],
numpy default_rng(seed), inputs drawn first): the first rate gets exactly the throughput
script's prompts, later rates the same lengths with fresh token ids (no prefix-cache hits
across rates). Greedy, `ignore_eos`, `max_tokens` = the output length.

Per request: TTFT (first streamed chunk), TPOT ((e2e - TTFT) / (output tokens - 1)), ITL
(every gap between streamed chunks, pooled) and end-to-end latency; output tokens from the
stream's usage chunk. Per rate: completed, failed, duration, request / output / total token
throughput and mean, median, p90, p99 of each latency in ms. Where the time goes: the server's
own means over the rate (from its `/metrics` histograms, scraped before and after: TTFT from
arrival in the API server to its first token, split into queue = arrival to first scheduled and
prefill = first scheduled to first token) and the share of the rate's wall time this client's
process was on a CPU (near 100%: the client, not the server, sets the latencies). Loopback servers only; every
request has --request-timeout and every rate --max-duration, after which what is still
running is cancelled and counted as failed.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import httpx
import numpy as np
from workloads import workload  # the same prompts as the offline run

PERCENTILES = (50, 90, 99)
METRICS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E"}


@dataclass
class RequestResult:
    input_len: int
    max_tokens: int
    ok: bool = False
    error: str = ""
    send_s: float = 0.0  # seconds after the rate's start
    ttft: float = 0.0
    e2el: float = 0.0
    output_tokens: int = 0
    chunks: int = 0  # streamed chunks that carried choices
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def fresh_prompts(prompts: list[list[int]], vocab: int, seed: int, k: int) -> list[list[int]]:
    """Same lengths, new ids: the k-th rate must not hit the prefix cache filled by earlier rates."""
    if k == 0:
        return prompts
    rng = np.random.default_rng([seed, k])
    return [rng.integers(0, vocab, len(p)).tolist() for p in prompts]


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int, k: int) -> list[float]:
    """Send times (s after the start): the first at 0, then gamma(burstiness) gaps of mean 1/rate
    (exponential, i.e. Poisson arrivals, when burstiness is 1); all 0 for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng([seed, k, 1])
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(n - 1, 0))
    return [0.0] + np.cumsum(gaps).tolist()


def rate_label(rate: float | str) -> str:
    return "inf" if str(rate) == "inf" else f"{float(rate):g}"


def parse_rates(text: str) -> list[float]:
    rates = [float(r) for r in text.split(",") if r.strip()]  # float("inf") parses "inf"
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"request rates must be > 0 (or inf), got {text!r}")
    return rates


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    sys.exit(f"--base-url {url}: this benchmark only talks to a server on this machine (127.0.0.1, ::1, "
             "localhost)")


def raise_fd_limit() -> None:
    """One socket per in-flight request: `inf` with many prompts outgrows the usual soft limit of 1024."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    except (ImportError, ValueError, OSError):
        pass


def server_info(client: httpx.Client, args) -> dict:
    """The served model's name, max_model_len and vocab size (from its config.json, or --vocab-size)."""
    r = client.get("/v1/models")
    r.raise_for_status()
    models = r.json()["data"]
    entry = next((m for m in models if m["id"] == args.model), None) if args.model else models[0]
    if entry is None:
        sys.exit(f"--model {args.model!r} is not served; the server has {[m['id'] for m in models]}")
    vocab = args.vocab_size
    if vocab is None:
        cfg_path = Path(entry.get("root") or "") / "config.json"
        if not cfg_path.is_file():
            sys.exit(f"cannot read the model's vocab size from {cfg_path}: pass --vocab-size")
        cfg = json.loads(cfg_path.read_text())
        vocab = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
        if not vocab:
            sys.exit(f"no vocab_size in {cfg_path}: pass --vocab-size")
    try:
        version = client.get("/version").json().get("version")
    except (httpx.HTTPError, ValueError):
        version = None
    return {"model": entry["id"], "root": entry.get("root"), "max_model_len": entry.get("max_model_len"),
            "vocab_size": int(vocab), "version": version}


async def send_one(session: aiohttp.ClientSession, model: str, prompt: list[int], max_tokens: int,
                   res: RequestResult) -> None:
    """One streaming completion; fills `res` (timings from just before the request is sent)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    chunks, usage_tokens, done = 0, None, False
    t0 = last = time.perf_counter()
    try:
        async with session.post("/v1/completions", json=body) as r:
            if r.status != 200:
                text = (await r.read()).decode(errors="replace")
                try:
                    text = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    pass
                res.error = f"HTTP {r.status}: {text[:200]}"
                return
            async for raw in r.content:  # one line at a time
                if not raw.startswith(b"data:"):
                    continue
                data = raw[5:].strip()
                if data == b"[DONE]":
                    res.e2el, done = time.perf_counter() - t0, True
                    break
                event = json.loads(data)
                if "error" in event:
                    err = event["error"]
                    res.error = f"stream error: {str(err.get('message', err) if isinstance(err, dict) else err)[:200]}"
                    return
                now = time.perf_counter()
                if event.get("choices"):
                    if chunks == 0:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    chunks, last = chunks + 1, now
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
        if not done:
            res.error = "stream ended without [DONE]"
        elif chunks == 0:
            res.error = "no tokens streamed"
        else:
            res.output_tokens = usage_tokens if usage_tokens is not None else chunks
            res.chunks = chunks
            res.ok = True
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:  # ValueError: a malformed event
        res.error = f"{type(e).__name__}: {str(e)[:200]}"


async def run_rate(args, model: str, prompts: list[list[int]], outs: list[int], offsets: list[float],
                   label: str) -> tuple[list[RequestResult], float]:
    """Send every request at its offset; returns the results and the duration (first send -> last end)."""
    results = [RequestResult(len(p), o) for p, o in zip(prompts, outs)]
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), desc=label, file=sys.stderr, leave=False)
        except ImportError:
            pass

    # aiohttp, as vLLM's benchmark: its streaming reads cost about half of httpx's per chunk,
    # so the client keeps up with hundreds of streams (see `client_cpu_busy`)
    async with aiohttp.ClientSession(base_url=args.base_url, headers=auth_headers(args),
                                     connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=args.request_timeout),
                                     read_bufsize=1 << 20) as session:
        start = time.perf_counter()

        async def one(i: int) -> None:
            try:
                async with sem or contextlib.nullcontext():
                    results[i].send_s = time.perf_counter() - start
                    await send_one(session, model, prompts[i], outs[i], results[i])
            finally:
                if bar:
                    bar.update(1)

        tasks: list[asyncio.Task] = []

        async def dispatch() -> None:
            for i, off in enumerate(offsets):
                delay = start + off - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))

        sender = asyncio.create_task(dispatch())
        done, _ = await asyncio.wait([sender], timeout=args.max_duration)
        if not done:  # out of time before every request was sent: send no more
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        remaining = args.max_duration - (time.perf_counter() - start)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(remaining, 0))
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - start
    if bar:
        bar.close()
    for r in results:
        if not r.ok and not r.error:
            r.error = f"not finished within --max-duration {args.max_duration:g} s"
    return results, duration


SERVER_HISTOGRAMS = {"ttft": "vllm:time_to_first_token_seconds", "queue": "vllm:request_queue_time_seconds",
                     "prefill": "vllm:request_prefill_time_seconds", "itl": "vllm:inter_token_latency_seconds"}


SPEC_COUNTERS = ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
                 "vllm:spec_decode_num_accepted_tokens_total")


def scrape(client: httpx.Client) -> dict[str, float]:
    """The `_sum` and `_count` samples of SERVER_HISTOGRAMS and the SPEC_COUNTERS from the
    server's /metrics ({} if none)."""
    try:
        text = client.get("/metrics").text
    except httpx.HTTPError:
        return {}
    wanted = {f"{name}_{part}" for name in SERVER_HISTOGRAMS.values() for part in ("sum", "count")} | set(SPEC_COUNTERS)
    samples: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in wanted:
            samples[name] = samples.get(name, 0.0) + float(rest.rsplit(" ", 1)[-1])
    return samples


def server_means_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Mean of each server histogram over what it observed between two scrapes, in ms."""
    out = {}
    for key, name in SERVER_HISTOGRAMS.items():
        n = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
        total = after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)
        out[key] = total / n * 1e3 if n > 0 else None
    return out


def spec_decode_rates(before: dict[str, float], after: dict[str, float]) -> dict[str, float] | None:
    """Speculative decoding between two scrapes: acceptance rate (accepted / draft tokens) and
    mean accepted length (1 + accepted / drafts); None where the server verified no drafts."""
    drafts, tokens, accepted = (after.get(n, 0.0) - before.get(n, 0.0) for n in SPEC_COUNTERS)
    if not drafts:
        return None
    return {"acceptance_rate": accepted / tokens, "mean_accepted_length": 1 + accepted / drafts}


def auth_headers(args) -> dict:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def stats_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None, "max": None, "std": None}
    a = np.asarray(values) * 1e3
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()), "std": float(a.std())}


def summarize(rate: float, results: list[RequestResult], duration: float, detailed: bool) -> dict:
    ok = [r for r in results if r.ok]
    n_in = sum(r.input_len for r in ok)
    n_out = sum(r.output_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    out = {
        "request_rate": "inf" if math.isinf(rate) else rate,
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": n_in, "total_output_tokens": n_out,
        "expected_output_tokens": sum(r.max_tokens for r in ok),
        "request_throughput": len(ok) / duration, "output_throughput": n_out / duration,
        "total_token_throughput": (n_in + n_out) / duration,
        "ttft_ms": stats_ms([r.ttft for r in ok]),
        "tpot_ms": stats_ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": stats_ms([g for r in ok for g in r.itl]),
        "e2el_ms": stats_ms([r.e2el for r in ok]),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:10]),
    }
    if detailed:
        out["requests"] = [asdict(r) | {"tpot": r.tpot} for r in results]
    return out


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def print_table(summary: dict) -> None:
    print(f"\n{summary['model']} at {summary['base_url']}: {summary['num_prompts']} prompts per rate, "
          f"{summary['workload']} workload, {summary['input_tokens']} input / {summary['output_tokens']} output "
          f"tokens; latencies in ms")
    head = (f"{'rate':>6s} {'done':>5s} {'fail':>5s} {'dur s':>7s} {'req/s':>7s} {'out tok/s':>10s} "
            f"{'tot tok/s':>10s}  {'metric':6s} {'mean':>9s} {'median':>9s} {'p90':>9s} {'p99':>9s} {'max':>9s}")
    print(head)
    print("-" * len(head))
    for row in summary["results"]:
        for j, (key, name) in enumerate(METRICS.items()):
            s = row[f"{key}_ms"]
            left = (f"{rate_label(row['request_rate']):>6s} {row['completed']:5d} {row['failed']:5d} "
                    f"{row['duration_s']:7.1f} {row['request_throughput']:7.2f} {row['output_throughput']:10,.0f} "
                    f"{row['total_token_throughput']:10,.0f}") if j == 0 else " " * 56
            print(f"{left}  {name:6s} {fmt(s['mean']):>9s} {fmt(s['median']):>9s} {fmt(s['p90']):>9s} "
                  f"{fmt(s['p99']):>9s} {fmt(s['max']):>9s}")
        m = row["server_mean_ms"]
        print(" " * 56 + f"  server means: TTFT {fmt(m['ttft'])} = queue {fmt(m['queue'])} + prefill "
              f"{fmt(m['prefill'])}, ITL {fmt(m['itl'])}; client on CPU {row['client_cpu_busy']:.0%} of the time")


def plot(summary: dict, path: str) -> None:
    """Median and p99 TTFT, TPOT and E2E latency against the achieved request rate."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (pip install matplotlib); no plot written",
              file=sys.stderr)
        return
    rows = [r for r in summary["results"] if r["completed"]]
    x = [r["request_throughput"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, name) in zip(axes, [("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "end-to-end latency")]):
        for stat, style in (("median", "o-"), ("p99", "s--")):
            ax.plot(x, [r[f"{key}_ms"][stat] if r[f"{key}_ms"][stat] is not None else float("nan") for r in rows],
                    style, label=stat)
        for r, xi in zip(rows, x):
            ax.annotate(f"{rate_label(r['request_rate'])}/s", (xi, r[f"{key}_ms"]["median"] or 0),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("achieved request rate (completed req/s)")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(name)
        if x and min(x) > 0 and max(x) / min(x) > 8:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"jaxpaged serving: {summary['model']}, {summary['workload']} workload, "
                 f"{summary['num_prompts']} prompts per rate ({summary['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000", help="the running jaxpaged.serve (loopback)")
    ap.add_argument("--model", help="served model name (default: the first one in /v1/models)")
    ap.add_argument("--api-key", default=os.environ.get("JAXPAGED_API_KEY"), help="or env JAXPAGED_API_KEY")
    ap.add_argument("--vocab-size", type=int, help="default: vocab_size of the served model's config.json")
    ap.add_argument("--request-rates", type=parse_rates, default=parse_rates("1,4,16,inf"),
                    help="comma-separated requests/s; inf = all at once (default 1,4,16,inf)")
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 = Poisson")
    ap.add_argument("--max-concurrency", type=int, default=None, help="client-side cap on requests in flight")
    ap.add_argument("--workload", default="fixed", choices=["fixed", "mixed"])
    ap.add_argument("--num-prompts", type=int, default=200, help="requests per rate")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-warmups", type=int, default=1, help="unmeasured short requests before the first rate")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--max-duration", type=float, default=1800.0,
                    help="seconds per rate; then what is still running is cancelled (counted as failed)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--detailed", action="store_true", help="also write every request's timings to --json")
    ap.add_argument("--plot", metavar="PNG", help="latency against request rate (needs matplotlib)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.num_prompts < 1 or args.min_len < 1 or args.max_len < args.min_len or args.input_len < 1 \
            or args.output_len < 1 or args.burstiness <= 0:
        ap.error("need --num-prompts, --input-len, --output-len, --min-len >= 1, --max-len >= --min-len, "
                 "--burstiness > 0")
    args.base_url = args.base_url.rstrip("/")
    check_loopback(args.base_url)
    raise_fd_limit()

    with httpx.Client(base_url=args.base_url, headers=auth_headers(args), timeout=30, trust_env=False) as client:
        try:
            info = server_info(client, args)
        except httpx.HTTPError as e:
            sys.exit(f"cannot reach the server at {args.base_url}: {e}")
    prompts, outs = workload(args, info["vocab_size"])
    longest = max(len(p) + o for p, o in zip(prompts, outs))
    if info["max_model_len"] and longest > info["max_model_len"]:
        sys.exit(f"the longest request is {longest} tokens (prompt + output) but the server's max_model_len "
                 f"is {info['max_model_len']}: lower the lengths or restart the server with a larger one")
    print(f"serving benchmark: {info['model']} at {args.base_url} (jaxpaged {info['version']}), "
          f"{args.num_prompts} {args.workload} prompts per rate at {', '.join(map(str, args.request_rates))} req/s",
          flush=True)

    if args.num_warmups:
        rng = np.random.default_rng([args.seed, 99])
        warm = [rng.integers(0, info["vocab_size"], min(16, len(prompts[0]))).tolist()
                for _ in range(args.num_warmups)]
        res, _ = asyncio.run(run_rate(args, info["model"], warm, [2] * len(warm), [0.0] * len(warm), "warm-up"))
        if not all(r.ok for r in res):
            sys.exit(f"warm-up request failed: {next(r.error for r in res if not r.ok)}")

    rows = []
    metrics = httpx.Client(base_url=args.base_url, headers=auth_headers(args), timeout=30, trust_env=False)
    for k, rate in enumerate(args.request_rates):
        ps = fresh_prompts(prompts, info["vocab_size"], args.seed, k)
        offsets = arrival_offsets(len(ps), rate, args.burstiness, args.seed, k)
        before, cpu0 = scrape(metrics), time.process_time()
        results, duration = asyncio.run(run_rate(args, info["model"], ps, outs, offsets, f"rate {rate:g}/s"))
        row = summarize(rate, results, duration, args.detailed)
        row["client_cpu_busy"] = (time.process_time() - cpu0) / duration
        after = scrape(metrics)
        row["server_mean_ms"], row["spec_decode"] = server_means_ms(before, after), spec_decode_rates(before, after)
        rows.append(row)
        ok = [r for r in results if r.ok and r.output_tokens > 1]
        if ok and all(r.chunks == 1 for r in ok):
            print("warning: the server streamed one chunk per request (it sends only deltas with text: a model "
                  "without a tokenizer? scripts/make_shape_model.py writes one for a random-weight shape), so TTFT is "
                  "the whole request and ITL is empty", file=sys.stderr)
        print(f"rate {rate:g}/s: {row['completed']}/{len(ps)} completed in {duration:.1f} s, "
              f"{row['output_throughput']:,.0f} output tok/s, median TTFT {fmt(row['ttft_ms']['median'])} ms"
              + (f"; errors: {row['errors']}" if row["errors"] else "")
              + ("; speculative decoding: acceptance {acceptance_rate:.2f}, mean accepted length "
                 "{mean_accepted_length:.2f}".format(**row["spec_decode"]) if row["spec_decode"] else ""), flush=True)
    metrics.close()

    summary = {
        "kind": "serving", "date": time.strftime("%Y-%m-%d"), "base_url": args.base_url, "model": info["model"],
        "server": info, "args": vars(args) | {"request_rates": [rate_label(r) for r in args.request_rates],
                                              "api_key": "***" if args.api_key else None},
        "workload": args.workload, "num_prompts": args.num_prompts,
        "input_tokens": sum(map(len, prompts)), "output_tokens": sum(outs), "results": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
        print(f"results written to {args.json}")
    if args.plot:
        plot(summary, args.plot)
    print_table(summary)
    return summary


if __name__ == "__main__":
    main()
