"""Structured output's cost in decode: TPOT at batch 64 with every row under a JSON schema, against
the same batch unconstrained (greedy head), with top-1 logprobs (the logprobs head) and
unconstrained on the `full` head (forced by a zero logit bias), in one run; random weights.

    python scripts/benchmark_structured.py --model-shape llama3-8b

The model directory (`make_shape_model.py --bpe-tokenizer`, cached under --model-dir) has a
byte-level BPE of Llama 3's vocabulary size, which spells JSON (the mask cost grows with the
vocabulary). The timed schemas are arrays, with `minItems` beyond the decode steps (so no row
can finish: the batch stays full; the table says how many rows still run at the end), of short
strings (`maxLength` 12; costly to fill, mostly for the large `minItems`:
docs/structured_output.md) and of objects with an integer, an unbounded string and an enum
array. TPOT is the wall time of `--decode-steps` engine steps after every row's first token,
per step (one token per row), the median of `--repeats` passes over the runs (interleaved). A second run of the batch under a bounded schema finishes every
row; its outputs are checked in plain Python (all must be valid; the GPU machine may lack
jsonschema).
`wait ms`: per step, the engine thread's wait for the device's outputs (TPOT - wait is its own
time); `inputs ms`: its time building the late heads' inputs; `fill ms`: the runner's worker
thread's time filling their allowed-token bitmasks (xgrammar), while the engine thread goes on.
The `grammar fills` lines count the timed steps' fills that stayed on one thread and those
that went to xgrammar's threads, with their median wall and CPU times.
The `step times` lines give the timed steps' spread (a mean above the median is a few slow
steps). The `garbage collections` lines count the collector's runs during the timed steps (the engine
freezes its start-up heap, so a run of the oldest generation should take milliseconds).
The `bitmask fill alone` lines time each run's fill alone at its last step (the same
grammars, nothing else running): as the engine fills them, on xgrammar's threads and on one.
The `late head path` lines split a late step's time, from the previous step's outputs on the
host to its own, into the engine's processing, the hand-over to the fill, the fill, the head's
dispatch and the wait for the device (medians). `--trace DIR` then profiles 16 steps of the
greedy and JSON-objects runs and prints their device timelines (`device_timeline.py`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
from benchmark_throughput import SHAPES, enable_compilation_cache, wait_for_device
from make_shape_model import make_shape_model

ITEM = {"type": "string", "maxLength": 12}
OBJECT = {"type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string"},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}}},
          "required": ["id", "name", "tags"]}
HOST_SECONDS = {"inputs": 0.0, "fill": 0.0}  # host time in late heads' inputs, in bitmask fills
LATE_STEPS: list[dict] = []  # per late step, when each part of its head's path ended (`time_head_inputs`)
FILLS: list[tuple[bool, float, float]] = []  # per grammar fill: (all on one thread, wall s, its thread's CPU s)
GC_PAUSES: list[tuple[int, float]] = []  # per garbage collection: (generation, seconds)
_gc_started = [0.0]


def _time_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        GC_PAUSES.append((info["generation"], time.perf_counter() - _gc_started[0]))


gc.callbacks.append(_time_gc)
# a late step's head path, in order: (name, event that ends it); the first starts at the previous
# late step's outputs on the host
PATH = (("outputs -> hand-over", "hand_over"), ("-> fill starts", "fill_start"), ("fill", "fill_end"),
        ("-> head dispatched", "dispatched"), ("-> outputs on host", "fetched"))


def time_head_inputs(runner) -> None:
    """Count the host time of the runner's late head inputs into HOST_SECONDS: "inputs" on the
    engine thread (`InputBuilder.finish_sampling`), "fill" where the bitmask is filled
    (`LateHeadInputs.fill`: for grammar rows, xgrammar's bitmask fill); and record each late
    step's path from the engine's hand-over to its outputs on the host in LATE_STEPS (the
    events of a step travel with its inputs, on whichever thread fills them and then
    dispatches the head)."""
    from jaxpaged.engine.input_builder import LateHeadInputs
    from jaxpaged.engine.structured_output import request

    filler = getattr(request, "BitmaskFiller", None)  # (older trees of an A/B run lack it)
    if filler is not None:
        call = filler.__call__

        def timed_call(self, mask, grammars):
            fill, used = self.fill, []  # the thread counts of this fill's xgrammar calls
            self.fill = lambda *a: (used.append(a[-1]), fill(*a))[1]
            c, t = time.thread_time(), time.perf_counter()
            try:
                call(self, mask, grammars)
            finally:
                self.fill = fill
            if used:
                FILLS.append((max(used) == 1, time.perf_counter() - t, time.thread_time() - c))
        filler.__call__ = timed_call

    local = threading.local()  # `pending`: the hand-over's events; `filled`: the filled inputs'

    def timed(fn, key):
        def wrapper(*args):
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                HOST_SECONDS[key] += time.perf_counter() - t
        return wrapper
    finish_sampling, fill = timed(runner.inputs.finish_sampling, "inputs"), timed(LateHeadInputs.fill, "fill")
    hand_over, run_head, fetch = runner.hand_over, runner.run_head, runner.fetch

    def timed_hand_over(launched):
        local.pending = launched.events = {"hand_over": time.perf_counter()}
        hand_over(launched)

    def timed_finish_sampling(late):  # in the hand-over, before any other thread sees the inputs
        inputs = finish_sampling(late)
        inputs.events = local.pending
        return inputs

    def timed_fill(self):
        self.events["fill_start"] = time.perf_counter()
        try:
            return fill(self)
        finally:
            self.events["fill_end"] = time.perf_counter()
            local.filled = self.events  # this thread dispatches the head next

    def timed_run_head(*args, **kwargs):
        out = run_head(*args, **kwargs)
        if getattr(local, "filled", None) is not None:
            local.filled["dispatched"], local.filled = time.perf_counter(), None
        return out

    def timed_fetch(launched):
        out = fetch(launched)
        if getattr(launched, "events", None):
            LATE_STEPS.append(launched.events | {"fetched": time.perf_counter()})
        return out
    runner.inputs.finish_sampling, LateHeadInputs.fill = timed_finish_sampling, timed_fill
    runner.hand_over, runner.run_head, runner.fetch = timed_hand_over, timed_run_head, timed_fetch


def late_path(steps: list[dict]) -> dict[str, float] | None:
    """Median seconds of each part of `PATH` over consecutive late steps (None: fewer than 2)."""
    if len(steps) < 2:
        return None
    parts = {name: [] for name, _ in PATH}
    for prev, cur in itertools.pairwise(steps):
        start = prev["fetched"]
        for name, event in PATH:
            parts[name].append(cur[event] - start)
            start = cur[event]
    return {name: float(np.median(v)) for name, v in parts.items()}


def time_fill_alone(engine, vocab: int, reps: int = 20) -> dict:
    """Time xgrammar's bitmask fill of the running rows' grammars alone, once the device is done
    (so no step's own fill runs beside it): as the engine fills them (`fill_grammar_bitmask`:
    on one thread while that is cheap), on xgrammar's `fill_threads()` threads, and on one
    (xgrammar called here, so that the A/B against an older jaxpaged, `ab` in
    scripts/run_h200_suite.sh, runs too)."""
    import xgrammar

    from jaxpaged.engine.sample.token_mask import num_words
    from jaxpaged.engine.structured_output.compiler import usable_cpus
    from jaxpaged.engine.structured_output.request import fill_grammar_bitmask, fill_threads

    wait_for_device(engine)
    grammars = [s.structured_output for seqs in engine.core.requests.values() for s in seqs if not s.is_finished]
    mask = np.full((len(grammars), num_words(vocab)), -1, np.int32)
    rows, matchers = list(range(len(grammars))), [g.matcher for g in grammars]
    on = {n: xgrammar.BatchGrammarMatcher(max_threads=n) for n in (1, fill_threads())}

    def timed(fill) -> float:
        fill()
        t = time.perf_counter()
        for _ in range(reps):
            fill()
        return (time.perf_counter() - t) / reps

    return dict(seconds=timed(lambda: fill_grammar_bitmask(mask, grammars)),
                threads_seconds=timed(lambda: on[fill_threads()].batch_fill_next_token_bitmask(matchers, mask, rows)),
                one_thread_seconds=timed(lambda: on[1].batch_fill_next_token_bitmask(matchers, mask, rows)),
                rows=len(grammars), threads=fill_threads(), usable_cpus=usable_cpus(), cpu_count=os.cpu_count())


@dataclasses.dataclass
class BatchRun:
    """One `run_batch`: per timed step, its wall time, the host's wait for the device, the engine
    thread's time building late heads' inputs and the bitmask fill; the share of rows still
    running at the end; the fill alone (`time_fill_alone`), the late steps' path (`late_path`)
    and the finished outputs' texts by request."""
    tpot: float
    running: float
    wait: float
    inputs: float
    fill: float
    fill_alone: dict | None
    path: dict[str, float] | None
    fills: list[tuple[bool, float, float]]
    texts: dict[str, str]
    gc_pauses: list[tuple[int, float]]
    step_seconds: list[float]


def run_batch(engine, params, batch: int, prompt_len: int, steps: int | None, vocab: int, tag: str,
              trace: str | None = None, fill_alone: bool = False) -> BatchRun:
    """Add `batch` random prompts under `params`, launch their prefill and wait for it, then time `steps`
    steps (None: run to the end); the rest is aborted. `trace`: a directory for a profile of the
    timed steps (`device_timeline.py` reads it); `fill_alone`: then time the structured rows'
    bitmask fill alone."""
    rng = np.random.default_rng(batch)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", rng.integers(0, vocab, prompt_len).tolist(), params)
    core, texts = engine.core, {}

    def step() -> None:
        for out in engine.step():
            if out.finished:
                texts[out.request_id] = out.outputs[0].text

    while any(not s.output_token_ids for seqs in core.requests.values() for s in seqs):
        step()  # a short row may finish while others are still prefilling
    wait_for_device(engine)  # the prefill's device work done before the timed steps
    n, wait, host, first_late, first_fill, first_gc = 0, core.runner.device_wait_seconds, dict(HOST_SECONDS), \
        len(LATE_STEPS), len(FILLS), len(GC_PAUSES)
    import jax
    with jax.profiler.trace(trace, create_perfetto_trace=True) if trace else contextlib.nullcontext():
        t = time.perf_counter()
        step_ends = [t]
        while engine.has_unfinished_requests() and (steps is None or n < steps):
            step()
            n += 1
            step_ends.append(time.perf_counter())
        if trace:
            wait_for_device(engine)
        elapsed = time.perf_counter() - t
    fills, pauses = FILLS[first_fill:], GC_PAUSES[first_gc:]  # the timed steps' (not the fill-alone timing's below)
    n = max(n, 1)
    wait = core.runner.device_wait_seconds - wait
    running = sum(not s.is_finished for seqs in core.requests.values() for s in seqs) / batch
    alone = time_fill_alone(engine, vocab) if fill_alone and params.structured_outputs is not None else None
    for request_id in list(core.requests):
        engine.abort_request(request_id)
    return BatchRun(elapsed / n, running, wait / n, (HOST_SECONDS["inputs"] - host["inputs"]) / n,
                    (HOST_SECONDS["fill"] - host["fill"]) / n, alone, late_path(LATE_STEPS[first_late:]),
                    fills, texts, pauses, np.diff(step_ends).tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-shape", choices=[*SHAPES, "tiny"], default="llama3-8b")
    ap.add_argument("--model-dir", default=None, help="default /tmp/jaxpaged-<shape>-bpe (made once)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over the runs (each run's median counts)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--compilation-cache", default="/tmp/jaxpaged-xla-cache", help="JAX persistent cache dir")
    ap.add_argument("--json")
    ap.add_argument("--trace", help="also profile --trace-steps steps of the greedy and JSON-objects runs into "
                                    "this directory and print their device timelines (scripts/device_timeline.py)")
    ap.add_argument("--trace-steps", type=int, default=16)
    args = ap.parse_args()
    model = Path(args.model_dir or f"/tmp/jaxpaged-{args.model_shape}-bpe")
    if not (model / "config.json").is_file():
        t = time.perf_counter()
        make_shape_model(model, args.model_shape, bpe_tokenizer=True)
        print(f"made {model} (BPE tokenizer trained in {time.perf_counter() - t:.0f} s)")
    import jax

    from jaxpaged import LLM, SamplingParams, StructuredOutputsParams

    enable_compilation_cache(args.compilation_cache)
    llm = LLM(str(model), load_format="dummy", max_model_len=args.max_model_len, max_num_seqs=args.batch,
              max_num_batched_tokens=args.max_num_batched_tokens, attention_backend=args.attention_backend,
              enable_prefix_caching=False)
    engine, vocab = llm.engine, llm.engine.model_config.vocab_size
    time_head_inputs(engine.core.runner)
    steps = args.decode_steps
    tokens = args.max_model_len - args.prompt_len - 1
    timed = {"type": "array", "items": ITEM, "minItems": tokens}  # more items than tokens: no row ends
    objects = {"type": "array", "items": OBJECT, "minItems": tokens}  # a more usual schema
    free = dict(temperature=0, max_tokens=tokens, ignore_eos=True, detokenize=False)
    runs = {"unconstrained (greedy head)": SamplingParams(**free),
            "logprobs=1 (logprobs head)": SamplingParams(**free, logprobs=1),
            "unconstrained (full head)": SamplingParams(**free, logit_bias={0: 0.0}),  # only `full` has bias
            "JSON schema, every row": SamplingParams(temperature=0, max_tokens=tokens, detokenize=False,
                                                     structured_outputs=StructuredOutputsParams(json=timed)),
            "JSON objects, every row": SamplingParams(temperature=0, max_tokens=tokens, detokenize=False,
                                                      structured_outputs=StructuredOutputsParams(json=objects))}
    for name in ("JSON schema, every row", "JSON objects, every row"):  # grammars compiled, matchers warm
        run_batch(engine, runs[name], args.batch, args.prompt_len, 4, vocab, f"warm-{len(name)}")
    # `--repeats` passes over the runs, interleaved: a run's TPOT is its median pass (the machine
    # drifts between passes); the other lines are that pass's
    passes = [{name: run_batch(engine, p, args.batch, args.prompt_len, steps, vocab, f"r{k}-{i}",
                               fill_alone=k == args.repeats - 1)
               for i, (name, p) in enumerate(runs.items())} for k in range(args.repeats)]
    rows = {name: sorted((ps[name] for ps in passes), key=lambda r: r.tpot)[(args.repeats - 1) // 2] for name in runs}
    for name in runs:  # the fill-alone timing ran in the last pass only
        rows[name].fill_alone = passes[-1][name].fill_alone
    bounded = {"type": "array", "items": ITEM, "minItems": 1, "maxItems": 4}  # `_valid`'s bounds
    texts = run_batch(engine, SamplingParams(temperature=0, max_tokens=tokens,
                                             structured_outputs=StructuredOutputsParams(json=bounded)),
                      args.batch, args.prompt_len, None, vocab, "valid").texts
    valid = sum(_valid(text, 1, 4) for text in texts.values())
    base = rows["unconstrained (greedy head)"].tpot
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}; {args.model_shape}, vocab {vocab}, "
          f"batch {args.batch}, {steps} decode steps after a {args.prompt_len}-token prompt")
    print(f"{'run':30s} {'TPOT ms':>8s} {'x greedy':>8s} {'running':>8s} {'wait ms':>8s} {'inputs ms':>9s} "
          f"{'fill ms':>8s}")
    for name, r in rows.items():
        print(f"{name:30s} {r.tpot * 1e3:8.2f} {r.tpot / base:8.3f} {r.running:8.0%} {r.wait * 1e3:8.2f} "
              f"{r.inputs * 1e3:9.2f} {r.fill * 1e3:8.2f}")
    for name in runs:
        print(f"TPOT per pass, {name}: " + " / ".join(f"{ps[name].tpot * 1e3:.2f}" for ps in passes) + " ms")
    for name, r in rows.items():
        if r.path is not None:
            print(f"late head path, {name} (median ms): " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in r.path.items())
                  + f"; sum {sum(r.path.values()) * 1e3:.2f}")
    for name, r in rows.items():
        ones = [f for f in r.fills if f[0]]
        many = [f for f in r.fills if not f[0]]
        if r.fills and r.fill_alone is not None:
            med = lambda fs, i: np.median([f[i] for f in fs]) * 1e3 if fs else float("nan")  # noqa: E731
            print(f"grammar fills, {name}: {len(ones)} of {len(r.fills)} on one thread (median wall "
                  f"{med(ones, 1):.2f} ms, CPU {med(ones, 2):.2f} ms), {len(many)} with the threads (median wall "
                  f"{med(many, 1):.2f} ms, CPU {med(many, 2):.2f} ms)")
    for name, r in rows.items():
        st = np.asarray(r.step_seconds) * 1e3
        med = float(np.median(st))
        slow = st[st > 1.5 * med]
        print(f"step times, {name}: median {med:.2f} ms, p90 {np.percentile(st, 90):.2f}, max {st.max():.2f}; "
              f"{len(slow)} steps over 1.5x the median, {float(np.sum(slow - med)):.1f} ms past it in all")
    for name, r in rows.items():
        old = [p for g, p in r.gc_pauses if g == 2]
        print(f"garbage collections while timed, {name}: {len(r.gc_pauses)} taking {sum(p for _, p in r.gc_pauses) * 1e3:.1f} ms"
              f" in all, {len(old)} of the oldest generation ({sum(old) * 1e3:.1f} ms)")
    for name, r in rows.items():
        if (fa := r.fill_alone) is not None:
            print(f"bitmask fill alone, {name}: {fa['seconds'] * 1e3:.2f} ms for {fa['rows']} rows as the engine "
                  f"fills them, {fa['threads_seconds'] * 1e3:.2f} ms on {fa['threads']} xgrammar threads, "
                  f"{fa['one_thread_seconds'] * 1e3:.2f} ms on one (in the engine: "
                  f"{r.fill * 1e3:.2f} ms; {fa['usable_cpus']} of {fa['cpu_count']} CPUs usable)")
    print(f"bounded schema run to the end: {valid}/{args.batch} outputs valid ({len(texts)} finished)")
    traced = {"unconstrained (greedy head)": "greedy", "JSON objects, every row": "json-objects"}
    for i, (name, sub) in enumerate(traced.items() if args.trace else ()):
        from device_timeline import main as timeline
        folder = str(Path(args.trace) / sub)
        tpot = run_batch(engine, runs[name], args.batch, args.prompt_len, args.trace_steps, vocab, f"t{i}", folder).tpot
        print(f"\ntraced {name}: {args.trace_steps} steps, {tpot * 1e3:.2f} ms a step (profiled)")
        timeline([folder])
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
                                               "device": jax.devices()[0].device_kind, "args": vars(args),
                                               "tpot_s": {k: r.tpot for k, r in rows.items()},
                                               "tpot_passes_s": {k: [ps[k].tpot for ps in passes] for k in runs},
                                               "running": {k: r.running for k, r in rows.items()},
                                               "device_wait_s": {k: r.wait for k, r in rows.items()},
                                               "head_inputs_s": {k: r.inputs for k, r in rows.items()},
                                               "bitmask_fill_s": {k: r.fill for k, r in rows.items()},
                                               "bitmask_fill_alone": {k: r.fill_alone for k, r in rows.items()
                                                                      if r.fill_alone},
                                               "late_head_path_s": {k: r.path for k, r in rows.items() if r.path},
                                               "valid": valid, "finished": len(texts)}, indent=2))


def _valid(text: str, min_items: int, max_items: int) -> bool:
    """Whether `text` is a JSON array of `min_items` .. `max_items` strings of at most ITEM's length."""
    try:
        items = json.loads(text)
    except ValueError:
        return False
    return (isinstance(items, list) and min_items <= len(items) <= max_items
            and all(isinstance(x, str) and len(x) <= ITEM["maxLength"] for x in items))


if __name__ == "__main__":
    main()
