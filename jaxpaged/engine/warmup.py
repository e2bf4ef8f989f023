"""A `ModelRunner`'s start-up: every step program compiled before the first request, then run
once on all-padding batches (they write only the scratch block), so that nothing compiles
while serving. The heads come first, before the KV pool exists: their measured memory sizes
the pool, and their autotuning has the device's memory to itself. Then the forwards and decode
loops, in threads (XLA compiles outside the GIL). It drives the runner's programs directly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time

import jax

from jaxpaged.engine.compile_cache import in_parallel
from jaxpaged.engine.model_runner import ModelRunner
from jaxpaged.engine.sample.features import LOOP_VARIANTS, VARIANTS, VERIFY_VARIANTS, SamplingFeatures
from jaxpaged.engine.scheduler_output import SchedulerOutput
from jaxpaged.engine.spec_decode.verify import verify_kwargs
from jaxpaged.kernels.attention_tiles import DECODE_ONLY_MAX_TOKENS
from jaxpaged.models.kv_cache import KVCache

logger = logging.getLogger("jaxpaged")


class Warmup:
    """`compile_heads` (before the KV pool), then `run(kv)`; `log` holds (program, start s,
    seconds) per compile, for the engine's start-up report."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.log: list[tuple[str, float, float]] = []
        self._t0 = time.perf_counter()
        self._log_lock = threading.Lock()  # the compile threads log in turn, the counts in order
        r = runner
        # every program: heads (bucket x variant), forwards, decode loops, verify heads (progress log)
        self.num_programs = len(r.buckets) * (len(VARIANTS) + 1) + len(r.short_query_buckets) \
            + len(r.loop_buckets) * len(LOOP_VARIANTS) + (len(r.buckets) * len(VERIFY_VARIANTS) if r.speculative else 0)
        self._padding = None  # the all-padding step inputs per (bucket, variant, speculative)

    def compile_heads(self, threads: int | None = None) -> int:
        """Compile every head (bucket x variant) in `threads` threads. Returns the largest
        per-device memory one needs besides its arguments (temporaries and outputs, e.g. the
        prompt logprobs' f32 [T, V] logits): the engine keeps it free when it sizes the KV pool."""
        r = self.runner
        # keys (bucket, variant, speculative): the sampling heads, and the verify heads if speculating
        heads = [(t, v, False) for t in r.buckets for v in VARIANTS]
        heads += [(t, v, True) for t in r.buckets for v in VERIFY_VARIANTS] if r.speculative else []
        self._padding = {key: r.inputs.build(SchedulerOutput([]), *key) for key in heads}
        return max(in_parallel(threads, self._compile_head, heads))

    def _compile_head(self, key: tuple[int, SamplingFeatures, bool]) -> int:
        """Compile the head of (bucket, variant, speculative); returns its temporary + output
        bytes per device."""
        r, (t, variant, speculative) = self.runner, key
        inp = self._padding[key]
        hidden = jax.ShapeDtypeStruct((t, r.cfg.hidden_size), r.params["embed"].dtype, sharding=r.hidden_sharding)
        program, kw = ((r.verify_program, verify_kwargs(variant)) if speculative
                       else (r.head_program, {"variant": variant}))
        with self._logged(f"{'verify head' if speculative else 'head'} {t} {variant.name}"):
            mem = program.lower(r.top_params, hidden, inp.sampling, layout=inp.sampling_layout,
                                num_prev=r.max_num_seqs, **kw).compile().memory_analysis()
        return 0 if mem is None else mem.temp_size_in_bytes + mem.output_size_in_bytes

    @contextlib.contextmanager
    def _logged(self, program: str):
        """Add the block's wall time to `log` (which start-up compiles bound it)."""
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        with self._log_lock:
            self.log.append((program, round(t0 - self._t0, 2), round(seconds, 2)))
            if len(self.log) <= self.num_programs:
                logger.info("warm-up: compiled %d/%d programs (%s, %.1f s)", len(self.log), self.num_programs,
                            program, seconds)

    def run(self, kv: KVCache, threads: int | None = None) -> None:
        """Give the runner the KV pool, compile every forward and decode loop variant (in
        `threads` threads), then run every program once on the all-padding batches."""
        r = self.runner
        r.kv = kv
        inputs, self._padding = self._padding, None  # host arrays, not needed after start-up
        loops = {(t, v): r.inputs.build(SchedulerOutput([], multi_step=True), t, v)
                 for t in r.loop_buckets for v in LOOP_VARIANTS}
        forwards = [(t, None) for t in r.buckets] + [(t, DECODE_ONLY_MAX_TOKENS) for t in r.short_query_buckets]

        def compile_forward(t: int, max_query_len: int | None):
            inp = inputs[t, VARIANTS[0], False]
            with self._logged(f"forward {t}" + (f" q<={max_query_len}" if max_query_len else "")):
                r.forward_program(inp.step_layout).lower(r.params, r.kv, inp.step, r.prev_tokens,
                                                         layout=inp.step_layout, max_query_len=max_query_len).compile()

        def compile_loop(t: int, variant: SamplingFeatures):
            inp = loops[t, variant]
            with self._logged(f"loop {t} {variant.name}"):
                r.loop_program.lower(r.params, r.kv, inp.step, r.prev_tokens, layout=inp.step_layout,
                                     max_query_len=inp.max_query_len, variant=variant, num_steps=r.num_steps,
                                     num_prev=r.max_num_seqs).compile()

        jobs = [(compile_forward, f) for f in forwards] + [(compile_loop, key) for key in loops]
        in_parallel(threads, lambda job: job[0](*job[1]), jobs)
        with self._logged("first runs"):  # each bucket's forward once, then each of its heads on its output
            for t in r.buckets:
                first = inputs[t, VARIANTS[0], False]
                hidden = r.run_forward(first.step, first.step_layout, first.max_query_len)
                for (b, variant, speculative), inp in inputs.items():
                    if b == t:
                        run = r.run_verify if speculative else r.run_head
                        jax.block_until_ready(run(variant, hidden, inp.sampling, inp.sampling_layout))
            for t, q in forwards:
                if q:
                    inp = dataclasses.replace(inputs[t, VARIANTS[0], False], max_query_len=q)
                    r.fetch(r.submit([], VARIANTS[0], inp, multi_step=False))
            for (t, variant), inp in loops.items():
                r.fetch(r.submit([], variant, inp, multi_step=True))
