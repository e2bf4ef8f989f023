"""`EngineCore`: the scheduler and the model runner over token ids; one step at a time.

    Scheduler.schedule() -> SchedulerOutput -> ModelRunner.launch()   step n+1 dispatched, then for step n-1:
    ModelRunner.fetch() -> ModelRunnerOutput -> Request.append_token (EOS, stop ids, length)
                        -> EngineCoreOutputs (per sample: new ids, logprobs) -> Scheduler.commit()

It knows no text: prompts arrive tokenized (`EngineCoreRequest`), stop strings are found by
the client's output processor, which then finishes the sample here (`finish_stopped`). It runs
in the engine-core process (`core_proc`) or inside the offline `LLMEngine`.
"""
from __future__ import annotations

import functools
import logging
import time
from collections import deque

from jax.sharding import NamedSharding

from jaxpaged.engine.block_manager import BlockManager
from jaxpaged.engine.buckets import token_buckets
from jaxpaged.engine.compile_cache import enable_compilation_cache, log_late_compiles
from jaxpaged.engine.config import EngineConfig
from jaxpaged.engine.device_memory import kv_pool_blocks
from jaxpaged.engine.gc_utils import freeze_gc_heap
from jaxpaged.engine.mesh import init_distributed, make_mesh, shard_attention
from jaxpaged.engine.messages import CoreInfo, EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, SchedulerStats
from jaxpaged.engine.model_runner import ModelRunner
from jaxpaged.engine.runner_output import Launched, ModelRunnerOutput
from jaxpaged.engine.platform_defaults import set_default_args
from jaxpaged.engine.processor import load_tokenizer
from jaxpaged.engine.request import Request
from jaxpaged.engine.sample.features import SamplingFeatures, features_of
from jaxpaged.engine.scheduler import Scheduler
from jaxpaged.engine.scheduler_output import SchedulerOutput
from jaxpaged.engine.spec_decode.draft_model_proposer import DraftModelProposer
from jaxpaged.engine.spec_decode.drafter import make_drafter
from jaxpaged.engine.spec_decode.metrics import SpecDecodingStats
from jaxpaged.engine.structured_output.manager import StructuredOutputManager
from jaxpaged.engine.structured_output.reasoning import ReasoningTokens
from jaxpaged.engine.warmup import Warmup
from jaxpaged.kernels import get_attention
from jaxpaged.models import load_model
from jaxpaged.models.kv_cache import init_kv_cache, kv_cache_dtype
from jaxpaged.models.quantization import load_quantization_config
from jaxpaged.models.quantization.kernels import small_step_buckets
from jaxpaged.models.quantization.kv_scales import pool_scales
from jaxpaged.models.sharding import KV_POOL

logger = logging.getLogger("jaxpaged")
GRAMMAR_POLL_S = 0.05  # an engine with only compiling grammars to wait for waits this long per step


class EngineCore:
    def __init__(self, config: EngineConfig):
        t0 = time.perf_counter()
        enable_compilation_cache()  # restarts reuse the compiled steps
        log_late_compiles(None)  # until this engine's warm-up is done
        if config.num_processes > 1:
            init_distributed(config.coordinator_address, config.num_processes, config.process_id)
        self.mesh = make_mesh(config.tensor_parallel_size) if config.tensor_parallel_size > 1 else None
        self.model_config, params = load_model(config.model, config.dtype, config.load_format, self.mesh,
                                               config.quantization)
        cfg = self.model_config
        # the sizes left unset, for this platform (smaller on a CPU)
        self.config = config = set_default_args(config, cfg.max_position_embeddings)
        self.max_model_len = config.max_model_len
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {cfg.max_position_embeddings}")
        self.max_num_batched_tokens = config.max_num_batched_tokens
        attention = get_attention(config.attention_backend)
        if self.mesh is not None:
            attention = shard_attention(attention, self.mesh)
        tokenizer = functools.cache(lambda: load_tokenizer(config.tokenizer or config.model))  # loaded once, if needed
        eos = set(cfg.eos_token_ids)
        if not eos and (tok := tokenizer()) is not None \
                and tok.eos_token_id is not None:
            eos = {tok.eos_token_id}
        self.eos_token_ids = tuple(sorted(eos))
        self.runner = ModelRunner(cfg, params, attention, config.block_size, config.max_num_seqs,
                                  self.max_num_batched_tokens, self.max_model_len, self.eos_token_ids, self.mesh,
                                  config.token_buckets or tuple(token_buckets(
                                      self.max_num_batched_tokens, config.max_num_seqs,
                                      extra=(config.decoding_token_budget, *small_step_buckets(params)))),
                                  config.num_scheduler_steps, config.speculative_config)
        spec = config.speculative_config
        # before the KV pool: a draft model's KV is counted in its sizing
        self.drafter = make_drafter(config, cfg, params["embed"].dtype, attention, self.runner.buckets, self.mesh)
        draft = self.drafter if isinstance(self.drafter, DraftModelProposer) else None
        t1 = time.perf_counter()
        warmup = Warmup(self.runner)
        head_bytes = warmup.compile_heads(config.compile_threads)
        kv_dtype = kv_cache_dtype(config.kv_cache_dtype, params["embed"].dtype)  # the pools' (the draft's too)
        num_blocks = config.num_kv_blocks or kv_pool_blocks(self.config, cfg, self.max_model_len,
                                                            self.max_num_batched_tokens, kv_dtype, head_bytes,
                                                            draft=draft.model_config if draft else None)
        kv = init_kv_cache(cfg, num_blocks, config.block_size, kv_dtype,
                           NamedSharding(self.mesh, KV_POOL) if self.mesh else None,
                           *pool_scales(None if config.load_format == "dummy" else config.model, cfg, kv_dtype))
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.spec_stats = SpecDecodingStats(spec.num_speculative_tokens if spec is not None else 0)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, self.max_num_batched_tokens,
                                   config.num_scheduler_steps, config.long_prefill_token_threshold,
                                   config.decoding_token_budget, self.drafter)
        warmup.run(kv, config.compile_threads)
        if draft is not None:
            draft.warmup(num_blocks, kv_dtype, config.compile_threads)
        t2 = time.perf_counter()
        self.requests: dict[str, list[Request]] = {}  # each request's samples
        reasoning = (ReasoningTokens.of(config.reasoning_parser, tokenizer())
                     if config.reasoning_parser else None)  # its tags, whose end the grammars wait for
        self.structured_output = StructuredOutputManager(config.tokenizer or config.model, cfg.vocab_size,
                                                         self.eos_token_ids, config.num_processes > 1, reasoning)
        self._in_flight: deque[Launched] = deque()  # launched steps whose outputs are not processed yet
        self._depth = config.max_steps_in_flight if config.async_scheduling else 0
        self.num_prompt_tokens = 0  # computed prompt tokens (prefix-cache hits excluded)
        self.num_generation_tokens = 0
        quant = load_quantization_config(config.model, config.quantization)
        self.info = CoreInfo(config.model, self.max_model_len, cfg.vocab_size, config.block_size,
                             self.block_manager.num_total_blocks, list(self.eos_token_ids),
                             quant.method if quant else None, kv_dtype.name)
        self.startup = {"load_s": t1 - t0, "warmup_s": t2 - t1, "num_kv_blocks": num_blocks,
                        "kv_cache_dtype": kv_dtype.name, "kv_capacity_tokens": (num_blocks - 1) * config.block_size,
                        "buckets": self.runner.buckets, "compiles": warmup.log}
        logger.info("engine ready: %s", {k: v for k, v in self.startup.items() if k != "compiles"})
        log_late_compiles(logger)
        freeze_gc_heap()

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, req: EngineCoreRequest) -> None:
        """Queue a request's samples (checked by the client's `Processor`)."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already running")
        p = req.params
        features = features_of(p, self.model_config.vocab_size)
        seqs = []
        for i in range(p.n):
            seq = Request(req.request_id, i, req.prompt_token_ids, p, features, req.max_tokens, p.seed + i,
                          req.arrival_time, req.cache_salt)
            seq.fork_parent = seqs[0] if seqs else None
            seqs.append(seq)
            self.scheduler.add(seq)
        if p.structured_outputs is not None:
            self.structured_output.add_request(p.structured_outputs, seqs)
        self.requests[req.request_id] = seqs

    def abort_requests(self, request_ids: list[str]) -> None:
        """Stop requests and free their blocks (unknown or finished ids are ignored)."""
        for request_id in request_ids:
            for seq in self.requests.pop(request_id, []):
                self._finish(seq, "abort", None)

    def finish_stopped(self, stopped: list[tuple[str, int, str]]) -> None:
        """Finish samples (request_id, index) at the stop string the output side found."""
        for request_id, index, stop in stopped:
            seqs = self.requests.get(request_id)
            if seqs is not None:
                self._finish(seqs[index], "stop", stop)
                if all(s.is_finished for s in seqs):
                    del self.requests[request_id]

    def _finish(self, seq: Request, reason: str, stop: str | None) -> None:
        if not seq.is_finished:
            seq.finish(reason, stop)
        self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> SchedulerStats:
        bm, sched = self.block_manager, self.scheduler
        spec = self.spec_stats
        return SchedulerStats(len(sched.running), len(sched.waiting), bm.usage, self.num_prompt_tokens,
                              self.num_generation_tokens, sched.num_preemptions, bm.prefix_cache_queries,
                              bm.prefix_cache_hits, spec.num_drafts, spec.num_draft_tokens,
                              spec.num_accepted_tokens, list(spec.num_accepted_tokens_per_pos))

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        """Schedule and launch one step, then process the oldest launched steps beyond
        `max_steps_in_flight` (async scheduling: the host works on step n's outputs while the
        device runs the steps after it). Steps are processed first where the new step needs
        their sampled tokens on the host (`_steps_kept`); with nothing to launch, the oldest
        step is processed. A step whose head reads the requests' histories (grammar bitmask,
        penalties, bans, logprobs) launches late: its forward is dispatched, every step before
        it is processed (grammars advanced), then its head gets its inputs (`hand_over`): the
        device runs the forward meanwhile. Speculation proposes from every token of a request,
        so it runs synchronously: launched steps are processed before a step that may
        speculate, and before any step after one that did."""
        outputs = []
        for seq in self.structured_output.failed() if self.structured_output.compiling else ():
            self.abort_requests([seq.request_id])
            outputs.append(EngineCoreOutput(seq.request_id, seq.index, [], [], finish_reason="abort"))
        if self._in_flight and self.drafter is not None and (
                self.drafter.speculates(len(self.scheduler.running)) or any(s.speculative for s in self._in_flight)):
            outputs += self._process_oldest(len(self._in_flight))
        sched = self.scheduler.schedule()
        variant = self.runner.variant(sched)
        keep = self._steps_kept(sched, variant, self.runner.launches_late(sched, variant))
        if len(self._in_flight) > keep:
            outputs += self._process_oldest(len(self._in_flight) - keep)
            sched = sched.without_finished()
        if sched.scheduled:
            if sched.speculative:
                self.drafter.fill(sched.scheduled)  # the draft model's drafts (n-gram: already there)
            launched = self.runner.launch(sched, variant)
            self.scheduler.advance(sched)
            for i, row in enumerate(sched.scheduled):
                for _ in range(row.num_sampled):
                    row.request.add_pending(i)
            self._in_flight.append(launched)
            if launched.late is not None:  # processed while the forward runs; then the head's inputs
                try:
                    outputs += self._process_oldest(len(self._in_flight) - 1)
                finally:
                    self.runner.hand_over(launched)
        elif not self._in_flight and self.structured_output.compiling:
            self.structured_output.wait(GRAMMAR_POLL_S)  # idle but for compiling grammars: no spinning
        done = len(self._in_flight) - self._depth if sched.scheduled else min(len(self._in_flight), 1)
        return EngineCoreOutputs(outputs + self._process_oldest(done), self.stats())

    def _process_oldest(self, n: int) -> list[EngineCoreOutput]:
        """Process the `n` oldest launched steps (none if n <= 0)."""
        return [out for _ in range(n) for out in self._process(self.runner.fetch(self._in_flight.popleft()))]

    def _steps_kept(self, sched: SchedulerOutput, variant: SamplingFeatures, late: bool) -> int:
        """How many launched steps may stay unprocessed while `sched` launches: all of them when
        every row's unseen tokens are fed back on the device (`Request.feeds_back`), else 1
        (the newest, whose sampled ids the device holds); none for a step whose head reads the
        requests' histories before it launches (not `late`: those read them after)."""
        if (variant.needs_history and not late) or not self._in_flight:
            return 0
        newest = {row.request for row in self._in_flight[-1].rows if row.num_sampled}
        if all(row.request.feeds_back(row.start, row.num_new_tokens, row.request in newest) for row in sched.scheduled):
            return len(self._in_flight)
        return 1

    def _process(self, out: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """A finished step's sampled tokens into the requests (token-id stop rules), and one
        `EngineCoreOutput` per sample that has news."""
        outputs = []
        token_ids, logprobs = out.token_ids.T.tolist(), out.logprobs.T.tolist()  # [S][K], one conversion
        for i, row in enumerate(out.rows):
            seq = row.request
            if seq.is_finished:  # aborted, or finished by an earlier step: a wasted row
                continue
            prompt = None if seq.params.prompt_logprobs is None else out.prompt_chunk(
                i, row.start, row.num_new_tokens, seq.num_prompt_tokens)
            prompt_tokens = max(0, min(row.num_new_tokens, seq.num_prompt_tokens - row.start))
            self.num_prompt_tokens += prompt_tokens if row.num_sampled else row.num_new_tokens
            if not row.num_sampled:  # a prompt chunk: nothing sampled
                if seq.max_tokens == 0 and row.start + row.num_new_tokens == seq.num_tokens:
                    seq.finish("length")  # a prompt-only request ends with its prompt
                if prompt is not None or seq.is_finished:
                    outputs.append(EngineCoreOutput(seq.request_id, seq.index, [], [], prompt_logprobs=prompt,
                                                    finish_reason=seq.finish_reason,
                                                    num_cached_tokens=seq.num_cached_tokens,
                                                    first_scheduled_time=seq.first_scheduled_time))
                continue
            emitted = row.num_sampled if out.num_emitted is None else int(out.num_emitted[i])
            k = seq.append_sampled(token_ids[i][:emitted], row.num_sampled, i, self.eos_token_ids)
            if row.draft_token_ids:
                self.spec_stats.observe(len(row.draft_token_ids), emitted - 1)
                if not seq.is_finished:
                    self.scheduler.reject_drafts(seq, len(row.draft_token_ids) - (emitted - 1))
            self.num_generation_tokens += k
            o = EngineCoreOutput(seq.request_id, seq.index, token_ids[i][:k], logprobs[i][:k],
                                 prompt_logprobs=prompt, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                                 num_cached_tokens=seq.num_cached_tokens, first_scheduled_time=seq.first_scheduled_time)
            if seq.params.logprobs is not None:
                o.ranks = out.ranks[:k, i].tolist()
                if out.top_ids is not None:
                    o.top_ids, o.top_logprobs = out.top_ids[:k, i].tolist(), out.top_logprobs[:k, i].tolist()
            outputs.append(o)
        self.scheduler.commit([row.request for row in out.rows])
        for o in outputs:
            seqs = self.requests.get(o.request_id)
            if o.finish_reason is not None and seqs is not None and all(s.is_finished for s in seqs):
                del self.requests[o.request_id]
        return outputs
