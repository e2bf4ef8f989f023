"""Runs one scheduled step on the device: pads the batch to a token bucket, dispatches two
jitted programs on packed host inputs, and hands the sampled ids back as a `ModelRunnerOutput`.

The programs (a forward per token bucket, a head per bucket and sampling variant) are in
`step_programs.py`; each step uses the cheapest variant its requests allow. `launch` builds
the inputs (`input_builder.py`) and hands the dispatch to one worker thread: the engine
launches step n+1 while step n still runs, feeding back the tokens step n samples on the
device, and processes step n's outputs while the worker dispatches (XLA releases the GIL while
it launches the step's kernels). With multi-step decode (`num_steps` > 1) an all-decode step
runs the decode loop program: K iterations per dispatch, the sampled ids fed back on the device.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import sys
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxpaged.engine.buckets import decode_buckets, short_query_buckets, token_buckets
from jaxpaged.engine.compile_cache import in_parallel
from jaxpaged.engine.host_buffer import field_shape
from jaxpaged.engine.input_builder import InputBuilder, StepInputs
from jaxpaged.engine.sample.features import (LOOP_VARIANTS, VARIANTS, VERIFY_VARIANTS, SamplingFeatures, union,
                                             variant_for)
from jaxpaged.engine.runner_output import Launched, ModelRunnerOutput
from jaxpaged.engine.scheduler_output import ScheduledRequest, SchedulerOutput
from jaxpaged.engine.spec_decode.config import SpeculativeConfig
from jaxpaged.engine.spec_decode.verify import jitted_verify, verify_kwargs
from jaxpaged.engine.step_programs import jitted_step
from jaxpaged.kernels.paged_attention_gpu import DECODE_ONLY_MAX_TOKENS
from jaxpaged.models import ModelConfig
from jaxpaged.models.kv_cache import KVCache
from jaxpaged.models.sharding import KV_POOL

logger = logging.getLogger("jaxpaged")
# The engine thread and the dispatch worker share the GIL: a thread back from a C call that let
# it go (XLA's dispatch, xgrammar's bitmask fill) waits for it up to the interpreter's switch
# interval while the other runs Python: 5 ms by default, a step's length (docs/decisions.md).
GIL_SWITCH_INTERVAL_S = 0.0005


def _copy_to_host_early(outputs):
    """Start the device-to-host copies of a dispatched step's outputs (small: sampled ids and
    logprobs) as soon as they are computed, so that `fetch` finds them on the host instead of
    asking for them behind the next step's forward."""
    for leaf in jax.tree.leaves(outputs):
        leaf.copy_to_host_async()
    return outputs


class ModelRunner:
    """Start-up: `compile_heads` (before the KV pool exists: their memory sizes it), then
    `warmup(kv)`; then `launch` / `fetch` per step."""

    def __init__(self, cfg: ModelConfig, params: dict, attention, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, eos_token_ids: tuple[int, ...], mesh=None,
                 buckets: tuple[int, ...] | None = None, num_steps: int = 1, spec: SpeculativeConfig | None = None):
        self.cfg, self.params, self.kv = cfg, params, None
        self.top_params = {k: v for k, v in params.items() if k != "layers"}  # all the head reads
        self.max_num_seqs = max_num_seqs
        self.buckets = token_buckets(max_num_batched_tokens, max_num_seqs, buckets)
        self.short_query_buckets = short_query_buckets(self.buckets, max_num_seqs)
        self.num_steps = num_steps
        self.inputs = InputBuilder(block_size, max_num_seqs, max_model_len, eos_token_ids, cfg.vocab_size,
                                   self.short_query_buckets, num_steps, spec.num_speculative_tokens if spec else 0)
        self.decode_buckets = decode_buckets(self.buckets, max_num_seqs)
        self.loop_buckets = self.decode_buckets if num_steps > 1 else []
        replicated = NamedSharding(mesh, P()) if mesh is not None else None
        programs = jitted_step(cfg, attention, replicated, NamedSharding(mesh, KV_POOL) if mesh is not None else None)
        self._fwd, self._fwd_prefill = programs.forward, programs.forward_prefill
        self._head, self._loop = programs.head, programs.decode_loop
        self._verify = jitted_verify(cfg, replicated, spec.synthetic_acceptance_rate) if spec else None
        # where the forward leaves the hidden states (committed, as every step output)
        self._hidden_sharding = replicated or SingleDeviceSharding(jax.devices()[0])
        # the last step's sampled ids; committed like the step's outputs, so no second compile
        zeros = np.zeros(max_num_seqs, np.int32)
        self._prev_tokens = (jax.device_put(zeros, jax.devices()[0]) if replicated is None
                             else jax.make_array_from_callback(zeros.shape, replicated, lambda i: zeros[i]))
        self._dispatcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxpaged-dispatch")
        self._last_dispatch = concurrent.futures.Future()  # the worker's newest job (none yet: done)
        self._last_dispatch.set_result(None)
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        self.device_wait_seconds = 0.0  # the engine blocked in `fetch` (dispatch or device not done)
        self._padding = None  # start-up's all-padding step inputs per (bucket, variant): `compile_heads`
        self.compile_log: list[tuple[str, float, float]] = []  # start-up: (program, start s, seconds)
        self._t0 = time.perf_counter()
        # every start-up program: heads (bucket x variant), forwards, decode loops (progress log)
        self.num_programs = len(self.buckets) * len(VARIANTS) + len(self.buckets) + len(self.short_query_buckets) \
            + len(self.loop_buckets) * len(LOOP_VARIANTS) + (len(self.buckets) * len(VERIFY_VARIANTS) if spec else 0)

    def compile_heads(self, threads: int | None = None) -> int:
        """Compile every head (bucket x variant) in `threads` threads. Returns the largest
        per-device memory one needs besides its arguments (temporaries and outputs, e.g. the
        prompt logprobs' f32 [T, V] logits): the engine keeps it free when it sizes the KV
        pool. Before the pool exists, their autotuning has the device's memory to itself."""
        # all-padding steps (they write only the scratch block): compiled here, run by `warmup`
        # keys (bucket, variant, speculative): the sampling heads, and the verify heads if speculating
        heads = [(t, v, False) for t in self.buckets for v in VARIANTS]
        heads += [(t, v, True) for t in self.buckets for v in VERIFY_VARIANTS] if self._verify is not None else []
        self._padding = {key: self.inputs.build(SchedulerOutput([]), *key) for key in heads}
        return max(in_parallel(threads, self._compile_head, heads))

    def _compile_head(self, key: tuple[int, SamplingFeatures, bool]) -> int:
        """Compile the head of (bucket, variant, speculative); returns its temporary + output
        bytes per device."""
        t, variant, speculative = key
        inp = self._padding[key]
        hidden = jax.ShapeDtypeStruct((t, self.cfg.hidden_size), self.params["embed"].dtype,
                                      sharding=self._hidden_sharding)
        program, kw = ((self._verify, verify_kwargs(variant)) if speculative
                       else (self._head, {"variant": variant}))
        with self._logged(f"{'verify head' if speculative else 'head'} {t} {variant.name}"):
            mem = program.lower(self.top_params, hidden, inp.sampling, layout=inp.sampling_layout,
                                num_prev=self.max_num_seqs, **kw).compile().memory_analysis()
        return 0 if mem is None else mem.temp_size_in_bytes + mem.output_size_in_bytes

    @contextlib.contextmanager
    def _logged(self, program: str):
        """Add the block's wall time to `compile_log` (which start-up compiles bound it)."""
        t0 = time.perf_counter()
        yield
        self.compile_log.append((program, round(t0 - self._t0, 2), round(time.perf_counter() - t0, 2)))
        done = len(self.compile_log)  # list.append is atomic: the compile threads share it
        if done <= self.num_programs:
            logger.info("warm-up: compiled %d/%d programs (%s, %.1f s)", done, self.num_programs, program,
                        time.perf_counter() - t0)

    def warmup(self, kv: KVCache, threads: int | None = None) -> None:
        """Take the KV pool, compile every forward and decode loop variant (in `threads`
        threads), then run every program once on the all-padding batches of `compile_heads`."""
        self.kv = kv
        inputs, self._padding = self._padding, None  # host arrays, not needed after start-up
        loops = {(t, v): self.inputs.build(SchedulerOutput([], multi_step=True), t, v)
                 for t in self.loop_buckets for v in LOOP_VARIANTS}
        forwards = [(t, None) for t in self.buckets]
        forwards += [(t, DECODE_ONLY_MAX_TOKENS) for t in self.short_query_buckets]

        def compile_forward(t: int, max_query_len: int | None):
            inp = inputs[t, VARIANTS[0], False]
            with self._logged(f"forward {t}" + (f" q<={max_query_len}" if max_query_len else "")):
                self._forward_program(inp.step_layout).lower(
                    self.params, self.kv, inp.step, self._prev_tokens, layout=inp.step_layout,
                    max_query_len=max_query_len).compile()

        def compile_loop(t: int, variant: SamplingFeatures):
            inp = loops[t, variant]
            with self._logged(f"loop {t} {variant.name}"):
                self._loop.lower(self.params, self.kv, inp.step, self._prev_tokens, layout=inp.step_layout,
                                 max_query_len=inp.max_query_len, variant=variant, num_steps=self.num_steps,
                                 num_prev=self.max_num_seqs).compile()

        jobs = [(compile_forward, f) for f in forwards] + [(compile_loop, key) for key in loops]
        in_parallel(threads, lambda job: job[0](*job[1]), jobs)
        with self._logged("first runs"):  # each bucket's forward once, then each of its heads on its output
            for t in self.buckets:
                first = inputs[t, VARIANTS[0], False]
                hidden = self._run_forward(first.step, first.step_layout, first.max_query_len)
                for (b, variant, speculative), inp in inputs.items():
                    if b == t:
                        run = self._run_verify if speculative else self._run_head
                        jax.block_until_ready(run(variant, hidden, inp.sampling, inp.sampling_layout))
            for t, q in forwards:
                if q:
                    inp = dataclasses.replace(inputs[t, VARIANTS[0], False], max_query_len=q)
                    self.fetch(self._submit([], VARIANTS[0], inp, multi_step=False))
            for (t, variant), inp in loops.items():
                self.fetch(self._submit([], variant, inp, multi_step=True))

    def variant(self, sched: SchedulerOutput) -> SamplingFeatures:
        """The cheapest compiled sampling variant (verify variant if speculative) that serves
        every scheduled request."""
        return variant_for(union(r.request.features for r in sched.scheduled), sched.speculative)

    @staticmethod
    def launches_late(sched: SchedulerOutput, variant: SamplingFeatures) -> bool:
        """Whether `launch` dispatches the step's forward before its sampling inputs exist: a
        single step whose head reads the requests' histories (not the verify head, whose
        steps run synchronously; the decode loop never has history features)."""
        return variant.needs_history and not sched.speculative and not sched.multi_step

    def launch(self, sched: SchedulerOutput, variant: SamplingFeatures) -> Launched:
        """Build the padded inputs on the host and dispatch the step with sampling `variant`
        (does not wait for it). A step that `launches_late` dispatches only its forward now;
        its head waits on the worker thread until `hand_over` gives it the sampling inputs
        read from the requests' histories."""
        t = next(b for b in self.buckets if b >= sched.num_tokens)
        spec, late = sched.speculative, self.launches_late(sched, variant)
        inp = self.inputs.build(sched, t, variant, spec, late)
        if late:
            sampling = concurrent.futures.Future()
            future = self._dispatch_async(self.dispatch_late, variant, inp.step, inp.step_layout,
                                             inp.max_query_len, sampling)
            return Launched(sched.scheduled, inp.query_start, future, late=inp.late, sampling=sampling)
        return self._submit(sched.scheduled, variant, inp, sched.multi_step, spec)

    def hand_over(self, launched: Launched) -> None:
        """Build a late step's sampling inputs from the requests' histories now and let the worker
        fill its bitmask and dispatch its head (on failure the head fails too, raised by `fetch`:
        it never hangs)."""
        try:
            launched.sampling.set_result(self.inputs.finish_sampling(launched.late))
        except BaseException as e:
            launched.sampling.set_exception(e)
            raise

    def _dispatch_async(self, dispatch, *args) -> concurrent.futures.Future:
        """Run `dispatch(*args)` on the worker thread (one at a time, in order); its outputs start
        their copies to the host as soon as they are computed."""
        self._last_dispatch = self._dispatcher.submit(lambda: _copy_to_host_early(dispatch(*args)))
        return self._last_dispatch

    def _dispatch_now(self, dispatch, *args) -> concurrent.futures.Future:
        """`_dispatch_async` on the engine thread, for a step the engine waits for before it goes
        on (speculative steps run synchronously): no hand-over to the worker, whose return from
        each XLA call would wait for the GIL while the engine runs Python (up to the switch
        interval each time). Only once the worker's last dispatch is done: the dispatches own
        `kv` and `_prev_tokens` in order."""
        if not self._last_dispatch.done():
            return self._dispatch_async(dispatch, *args)
        future = concurrent.futures.Future()
        try:
            future.set_result(_copy_to_host_early(dispatch(*args)))
        except BaseException as e:  # raised by `fetch`, as from the worker
            future.set_exception(e)
        return future

    def _submit(self, rows: list[ScheduledRequest], variant: SamplingFeatures, inp: StepInputs,
                multi_step: bool, speculative: bool = False) -> Launched:
        """Queue the step's dispatch on the worker thread (one at a time, in order); a speculative
        step's runs now, on this thread (`_dispatch_now`)."""
        if speculative:
            future = self._dispatch_now(self.dispatch_verify, variant, inp.step, inp.step_layout,
                                           inp.max_query_len, inp.sampling, inp.sampling_layout)
            return Launched(rows, inp.query_start, future, speculative=True)
        if multi_step:
            future = self._dispatch_async(self.dispatch_loop, variant, inp.step, inp.step_layout,
                                             inp.max_query_len)
        else:
            future = self._dispatch_async(self.dispatch, variant, inp.step, inp.step_layout, inp.max_query_len,
                                             inp.sampling, inp.sampling_layout)
        return Launched(rows, inp.query_start, future, multi_step)

    def dispatch(self, variant: SamplingFeatures, step_buf: np.ndarray, step_layout, max_query_len: int | None,
                 sampling_buf: np.ndarray, sampling_layout):
        """Dispatch the forward and the head on packed inputs (one transfer each); returns the
        device outputs (sampled, prompt logprobs or None) without waiting. Owns `kv` and
        `_prev_tokens`: called on the worker thread once the engine runs."""
        return self._run_head(variant, self._run_forward(step_buf, step_layout, max_query_len), sampling_buf,
                              sampling_layout)

    def dispatch_late(self, variant: SamplingFeatures, step_buf: np.ndarray, step_layout, max_query_len: int | None,
                      sampling: concurrent.futures.Future):
        """`dispatch`, the head's inputs awaited after the forward is dispatched: the device runs
        the forward while the engine processes the steps before it and builds them; their
        bitmask is filled here, while the engine thread goes on to the next step."""
        hidden = self._run_forward(step_buf, step_layout, max_query_len)
        return self._run_head(variant, hidden, *sampling.result().fill())

    def dispatch_verify(self, variant: SamplingFeatures, step_buf: np.ndarray, step_layout,
                        max_query_len: int | None, sampling_buf: np.ndarray, sampling_layout):
        """Dispatch the forward and the verify head (speculative decoding; top-k / top-p and
        top-N logprobs if `variant` has them); as `dispatch`."""
        return self._run_verify(variant, self._run_forward(step_buf, step_layout, max_query_len), sampling_buf,
                                sampling_layout)

    def _run_forward(self, step_buf: np.ndarray, step_layout, max_query_len: int | None) -> jax.Array:
        """Dispatch a step's forward (updates `kv`); returns the hidden states."""
        hidden, self.kv = self._forward_program(step_layout)(self.params, self.kv, step_buf, self._prev_tokens,
                                                             layout=step_layout, max_query_len=max_query_len)
        return hidden

    def _run_head(self, variant: SamplingFeatures, hidden: jax.Array, sampling_buf: np.ndarray, sampling_layout):
        """Dispatch the head + sampler with `variant` on the forward's hidden states (updates
        `_prev_tokens`); returns (sampled, prompt logprobs or None)."""
        out, prompt, self._prev_tokens = self._head(self.top_params, hidden, sampling_buf, layout=sampling_layout,
                                                    variant=variant, num_prev=self.max_num_seqs)
        return out, prompt

    def _run_verify(self, variant: SamplingFeatures, hidden: jax.Array, sampling_buf: np.ndarray, sampling_layout):
        """Dispatch the verify head (as `_run_head`); returns (sampled [K + 1, S], num_emitted)."""
        out, num_emitted, self._prev_tokens = self._verify(self.top_params, hidden, sampling_buf,
                                                           layout=sampling_layout, num_prev=self.max_num_seqs,
                                                           **verify_kwargs(variant))
        return out, num_emitted

    def _forward_program(self, layout):
        """The forward program of a step's packed inputs: `_fwd_prefill` above the decode buckets."""
        return self._fwd if field_shape(layout, "token_ids")[0] <= self.decode_buckets[-1] else self._fwd_prefill

    def dispatch_loop(self, variant: SamplingFeatures, buf: np.ndarray, layout, max_query_len: int | None):
        """Dispatch the decode loop (`num_steps` iterations) on its packed inputs; as `dispatch`."""
        out, self.kv, self._prev_tokens = self._loop(
            self.params, self.kv, buf, self._prev_tokens, layout=layout, max_query_len=max_query_len,
            variant=variant, num_steps=self.num_steps, num_prev=self.max_num_seqs)
        return out, None

    def fetch(self, launched: Launched) -> ModelRunnerOutput:
        """Wait for a launched step and copy its outputs to the host ([K, S], K = 1 for a
        single step)."""
        t0 = time.perf_counter()
        sampled, prompt = jax.device_get(launched.outputs.result())
        self.device_wait_seconds += time.perf_counter() - t0
        if launched.speculative:  # [K + 1, S] already; `prompt` holds num_emitted
            return ModelRunnerOutput(launched.rows, launched.token_offsets, sampled.token_ids, sampled.logprobs,
                                     sampled.ranks, sampled.top_ids, sampled.top_logprobs, num_emitted=prompt)
        if not launched.multi_step:
            sampled = jax.tree.map(lambda x: x[None], sampled)
        return ModelRunnerOutput(launched.rows, launched.token_offsets, sampled.token_ids, sampled.logprobs,
                                 sampled.ranks, sampled.top_ids, sampled.top_logprobs, prompt)
