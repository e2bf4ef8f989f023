"""Runs one scheduled step on the device: pads the batch to a token bucket, dispatches two
jitted programs on packed host inputs, and hands the sampled ids back as a `ModelRunnerOutput`.

The programs (a forward per token bucket, a head per bucket and sampling variant) are in
`step_programs.py`; each step uses the cheapest variant its requests allow. `launch` builds
the inputs (`input_builder.py`) and hands the dispatch to one worker thread (a speculative
step, which the engine waits for, is dispatched on the engine thread): the engine
launches step n+1 while step n still runs, feeding back the tokens step n samples on the
device, and processes step n's outputs while the worker dispatches (XLA releases the GIL while
it launches the step's kernels). With multi-step decode (`num_steps` > 1) an all-decode step
runs the decode loop program: K iterations per dispatch, the sampled ids fed back on the device.
Start-up (compiling and first runs of every program) is `warmup.py`'s.
"""
from __future__ import annotations

import concurrent.futures
import sys
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxpaged.engine.buckets import decode_buckets, short_query_buckets, token_buckets
from jaxpaged.engine.host_buffer import field_shape
from jaxpaged.engine.input_builder import InputBuilder, StepInputs
from jaxpaged.engine.sample.features import SamplingFeatures, union, variant_for
from jaxpaged.engine.runner_output import Launched, ModelRunnerOutput
from jaxpaged.engine.scheduler_output import ScheduledRequest, SchedulerOutput
from jaxpaged.engine.spec_decode.config import SpeculativeConfig
from jaxpaged.engine.spec_decode.verify import jitted_verify, verify_kwargs
from jaxpaged.engine.step_programs import jitted_step
from jaxpaged.models import ModelConfig
from jaxpaged.models.sharding import KV_POOL

# The engine thread and the dispatch worker share the GIL: a thread back from a C call that let
# it go (XLA's dispatch, xgrammar's bitmask fill) waits for it up to the interpreter's switch
# interval while the other runs Python: 5 ms by default, a step's length (docs/decisions.md).
GIL_SWITCH_INTERVAL_S = 0.0001


def _copy_to_host_early(outputs):
    """Start the device-to-host copies of a dispatched step's outputs (small: sampled ids and
    logprobs) as soon as they are computed, so that `fetch` finds them on the host instead of
    asking for them behind the next step's forward."""
    for leaf in jax.tree.leaves(outputs):
        leaf.copy_to_host_async()
    return outputs


class ModelRunner:
    """`launch` / `fetch` per step, once `warmup.Warmup` has compiled every program and given
    the runner its KV pool (`kv`)."""

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
        self.head_program, self.loop_program = programs.head, programs.decode_loop
        self.verify_program = jitted_verify(cfg, replicated, spec.synthetic_acceptance_rate) if spec else None
        self.speculative = spec is not None
        # where the forward leaves the hidden states (committed, as every step output)
        self.hidden_sharding = replicated or SingleDeviceSharding(jax.devices()[0])
        # the last step's sampled ids; committed like the step's outputs, so no second compile
        zeros = np.zeros(max_num_seqs, np.int32)
        self.prev_tokens = (jax.device_put(zeros, jax.devices()[0]) if replicated is None
                            else jax.make_array_from_callback(zeros.shape, replicated, lambda i: zeros[i]))
        self._dispatcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxpaged-dispatch")
        self._last_dispatch = concurrent.futures.Future()  # the worker's newest job (none yet: done)
        self._last_dispatch.set_result(None)
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        self.device_wait_seconds = 0.0  # the engine blocked in `fetch` (dispatch or device not done)

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
        return self.submit(sched.scheduled, variant, inp, sched.multi_step, spec)

    def hand_over(self, launched: Launched) -> None:
        """Build a late step's sampling inputs from the requests' histories now and let the worker
        fill its bitmask and dispatch its head (on failure the head fails too, raised by `fetch`:
        it never hangs)."""
        try:
            launched.sampling.set_result(self.inputs.finish_sampling(launched.late))
        except BaseException as e:
            launched.sampling.set_exception(e)
            raise
        time.sleep(0)  # lets the GIL go: the woken worker starts the fill now, not a switch interval later

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
        `kv` and `prev_tokens` in order."""
        if not self._last_dispatch.done():
            return self._dispatch_async(dispatch, *args)
        future = concurrent.futures.Future()
        try:
            future.set_result(_copy_to_host_early(dispatch(*args)))
        except BaseException as e:  # raised by `fetch`, as from the worker
            future.set_exception(e)
        return future

    def submit(self, rows: list[ScheduledRequest], variant: SamplingFeatures, inp: StepInputs,
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
        `prev_tokens`: called on the worker thread once the engine runs."""
        return self.run_head(variant, self.run_forward(step_buf, step_layout, max_query_len), sampling_buf,
                              sampling_layout)

    def dispatch_late(self, variant: SamplingFeatures, step_buf: np.ndarray, step_layout, max_query_len: int | None,
                      sampling: concurrent.futures.Future):
        """`dispatch`, the head's inputs awaited after the forward is dispatched: the device runs
        the forward while the engine processes the steps before it and builds them; their
        bitmask is filled here, while the engine thread goes on to the next step."""
        hidden = self.run_forward(step_buf, step_layout, max_query_len)
        return self.run_head(variant, hidden, *sampling.result().fill())

    def dispatch_verify(self, variant: SamplingFeatures, step_buf: np.ndarray, step_layout,
                        max_query_len: int | None, sampling_buf: np.ndarray, sampling_layout):
        """Dispatch the forward and the verify head (speculative decoding; top-k / top-p and
        top-N logprobs if `variant` has them); as `dispatch`."""
        return self.run_verify(variant, self.run_forward(step_buf, step_layout, max_query_len), sampling_buf,
                                sampling_layout)

    def run_forward(self, step_buf: np.ndarray, step_layout, max_query_len: int | None) -> jax.Array:
        """Dispatch a step's forward (updates `kv`); returns the hidden states."""
        hidden, self.kv = self.forward_program(step_layout)(self.params, self.kv, step_buf, self.prev_tokens,
                                                            layout=step_layout, max_query_len=max_query_len)
        return hidden

    def run_head(self, variant: SamplingFeatures, hidden: jax.Array, sampling_buf: np.ndarray, sampling_layout):
        """Dispatch the head + sampler with `variant` on the forward's hidden states (updates
        `prev_tokens`); returns (sampled, prompt logprobs or None)."""
        out, prompt, self.prev_tokens = self.head_program(self.top_params, hidden, sampling_buf, layout=sampling_layout,
                                                          variant=variant, num_prev=self.max_num_seqs)
        return out, prompt

    def run_verify(self, variant: SamplingFeatures, hidden: jax.Array, sampling_buf: np.ndarray, sampling_layout):
        """Dispatch the verify head (as `run_head`); returns (sampled [K + 1, S], num_emitted)."""
        out, num_emitted, self.prev_tokens = self.verify_program(self.top_params, hidden, sampling_buf,
                                                                 layout=sampling_layout, num_prev=self.max_num_seqs,
                                                                 **verify_kwargs(variant))
        return out, num_emitted

    def forward_program(self, layout):
        """The forward program of a step's packed inputs: `_fwd_prefill` above the decode buckets."""
        return self._fwd if field_shape(layout, "token_ids")[0] <= self.decode_buckets[-1] else self._fwd_prefill

    def dispatch_loop(self, variant: SamplingFeatures, buf: np.ndarray, layout, max_query_len: int | None):
        """Dispatch the decode loop (`num_steps` iterations) on its packed inputs; as `dispatch`."""
        out, self.kv, self.prev_tokens = self.loop_program(
            self.params, self.kv, buf, self.prev_tokens, layout=layout, max_query_len=max_query_len,
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
