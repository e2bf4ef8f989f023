"""The engine loop: requests in, one scheduled step at a time, `RequestOutput`s out.

    Scheduler.schedule() -> SchedulerOutput -> ModelRunner.launch()   step n+1 dispatched, then for step n-1:
    ModelRunner.fetch() -> ModelRunnerOutput -> Request.append_token (core: ids, stop ids, length)
                        -> OutputProcessor (text, stop strings, logprobs) -> Scheduler.commit()
"""
from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path

import jax
import numpy as np
import transformers
from jax.sharding import NamedSharding

from jaxpaged.engine.block_manager import BlockManager
from jaxpaged.engine.config import EngineConfig
from jaxpaged.engine.device_memory import memory_budget
from jaxpaged.engine.mesh import init_distributed, make_mesh, shard_attention
from jaxpaged.engine.model_runner import Launched, ModelRunner, ModelRunnerOutput
from jaxpaged.engine.output_processor import OutputProcessor, RequestState
from jaxpaged.engine.outputs import RequestOutput
from jaxpaged.engine.request import Request
from jaxpaged.engine.sample.features import SamplingFeatures, features_of, variant_for
from jaxpaged.engine.sampling_params import SamplingParams
from jaxpaged.engine.scheduler import Scheduler, SchedulerOutput
from jaxpaged.kernels import get_attention
from jaxpaged.models import load_model
from jaxpaged.models.kv_cache import init_kv_cache, kv_bytes_per_block
from jaxpaged.models.sharding import KV_POOL

logger = logging.getLogger("jaxpaged")


def load_tokenizer(path: str | Path) -> transformers.PreTrainedTokenizerBase | None:
    """The HF tokenizer in `path`, or None when the directory has none (token-id prompts only)."""
    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return transformers.AutoTokenizer.from_pretrained(path)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        t0 = time.perf_counter()
        self.config = config
        if config.num_processes > 1:
            init_distributed(config.coordinator_address, config.num_processes, config.process_id)
        self.mesh = make_mesh(config.tensor_parallel_size) if config.tensor_parallel_size > 1 else None
        self.model_config, params = load_model(config.model, config.dtype, config.load_format, self.mesh)
        cfg = self.model_config
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.output = OutputProcessor(self.tokenizer)
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {cfg.max_position_embeddings}")
        self.max_num_batched_tokens = config.max_num_batched_tokens or 2048
        attention = get_attention(config.attention_backend)
        if self.mesh is not None:
            attention = shard_attention(attention, self.mesh)
        eos = set(cfg.eos_token_ids)
        if not eos and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = {self.tokenizer.eos_token_id}
        self.eos_token_ids = tuple(sorted(eos))
        self.runner = ModelRunner(cfg, params, attention, config.block_size, config.max_num_seqs,
                                  self.max_num_batched_tokens, self.max_model_len, self.eos_token_ids, self.mesh,
                                  config.token_buckets, config.num_scheduler_steps)
        t1 = time.perf_counter()
        head_bytes = self.runner.compile_heads(config.compile_threads)
        dtype = params["embed"].dtype
        num_blocks = config.num_kv_blocks or self._num_blocks_from_memory(dtype, head_bytes)
        kv = init_kv_cache(cfg, num_blocks, config.block_size, dtype,
                           NamedSharding(self.mesh, KV_POOL) if self.mesh else None)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, self.max_num_batched_tokens,
                                   config.num_scheduler_steps)
        self.runner.warmup(kv, config.compile_threads)
        t2 = time.perf_counter()
        self.requests: dict[str, list[Request]] = {}  # the core's state of each sample
        self.states: dict[str, list[RequestState]] = {}  # the output side's, index for index
        self._in_flight: deque[Launched] = deque()  # launched steps whose outputs are not processed yet
        self._depth = config.max_steps_in_flight if config.async_scheduling else 0
        self._rng = np.random.default_rng(config.seed)
        self.num_prompt_tokens = 0  # computed prompt tokens (prefix-cache hits excluded)
        self.num_generation_tokens = 0
        self.startup = {"load_s": t1 - t0, "warmup_s": t2 - t1, "num_kv_blocks": num_blocks,
                        "kv_capacity_tokens": (num_blocks - 1) * config.block_size,
                        "buckets": self.runner.buckets, "compiles": self.runner.compile_log}
        logger.info("engine ready: %s", {k: v for k, v in self.startup.items() if k != "compiles"})

    def _num_blocks_from_memory(self, dtype, head_bytes: int) -> int:
        """Pool size from `gpu_memory_utilization` of device memory, or a CPU default.
        `head_bytes`: the head programs' measured need beyond their arguments (per device)."""
        # bytes per block on each device (tensor parallelism splits the KV heads)
        per_block = kv_bytes_per_block(self.model_config, self.config.block_size, dtype) // self.config.tensor_parallel_size
        budget = memory_budget(jax.local_devices()[0])
        if budget is not None:
            # Keep room for the step's temporaries: the heads' as measured, the forward's
            # activations (f32 upper bound of hidden and MLP widths per token) estimated.
            cfg, t = self.model_config, self.max_num_batched_tokens
            reserve = head_bytes + t * (8 * cfg.hidden_size + 4 * cfg.intermediate_size) * 4
            free = budget.limit * self.config.gpu_memory_utilization - budget.in_use - reserve
        elif jax.default_backend() != "cpu":
            raise ValueError(f"the {jax.default_backend()} device reports no memory budget to size the KV "
                             "cache from: set num_kv_blocks (--num-kv-blocks)")
        else:
            tokens = self.config.max_num_seqs * (self.max_model_len or 0)
            free = min(self.config.cpu_kv_cache_bytes, tokens // self.config.block_size * per_block)
        num = int(free // per_block)
        needed = -(-self.max_model_len // self.config.block_size) + 1
        if num < needed:
            raise ValueError(f"KV cache of {num} blocks cannot hold one sequence of max_model_len "
                             f"{self.max_model_len} ({needed} blocks); lower max_model_len or raise memory")
        return num

    # ---- requests ------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> list[int]:
        """Queue a request; raises ValueError (with the numbers) if it can never run."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in (*params.stop_token_ids, *params.logit_bias)):
            raise ValueError(f"stop_token_ids and logit_bias token ids must be in [0, {vocab})")
        room = self.max_model_len - len(ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if max_tokens > room or room < 1:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} "
                f"for the completion). Please reduce the prompt or max_tokens.")
        blocks = -(-(len(ids) + max_tokens) // self.config.block_size)
        if blocks > self.block_manager.num_total_blocks:
            raise ValueError(f"the request needs {blocks} KV blocks but the pool has only "
                             f"{self.block_manager.num_total_blocks}")
        features = features_of(params, vocab)
        variant_for(features)  # a request no compiled variant serves is rejected here
        base_seed = params.seed if params.seed is not None else int(self._rng.integers(2**63))
        arrival_time = arrival_time or time.monotonic()
        seqs, states = [], []
        for i in range(params.n):
            seq = Request(request_id, i, ids, params, features, max_tokens, base_seed + i, arrival_time)
            seq.fork_parent = seqs[0] if seqs else None
            seqs.append(seq)
            states.append(self.output.new_state(request_id, i, prompt if isinstance(prompt, str) else None, ids,
                                                params, arrival_time))
            self.scheduler.add(seq)
        self.requests[request_id], self.states[request_id] = seqs, states
        return ids

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its blocks (unknown or finished ids are ignored)."""
        self.states.pop(request_id, None)
        for seq in self.requests.pop(request_id, []):
            if not seq.is_finished:
                seq.finish("abort")
            self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step, then process the oldest launched steps beyond
        `max_steps_in_flight` (async scheduling: the host works on step n's outputs while the
        device runs the steps after it). Steps are processed first where the new step needs
        their sampled tokens on the host (`_steps_kept`); with nothing to launch, the oldest
        step is processed."""
        sched = self.scheduler.schedule()
        variant = self.runner.variant(sched)
        outputs = []
        keep = self._steps_kept(sched, variant)
        if len(self._in_flight) > keep:
            outputs += self._process_oldest(len(self._in_flight) - keep)
            sched = sched.without_finished()  # e.g. a stop string found in a step just processed
        if sched.scheduled:
            launched = self.runner.launch(sched, variant)
            self.scheduler.advance(sched)
            for i, row in enumerate(sched.scheduled):
                for _ in range(row.num_sampled):
                    row.request.add_pending(i)
            self._in_flight.append(launched)
        done = len(self._in_flight) - self._depth if sched.scheduled else min(len(self._in_flight), 1)
        return outputs + self._process_oldest(done)

    def _process_oldest(self, n: int) -> list[RequestOutput]:
        """Process the `n` oldest launched steps (none if n <= 0)."""
        return [out for _ in range(n) for out in self._process(self.runner.fetch(self._in_flight.popleft()))]

    def _steps_kept(self, sched: SchedulerOutput, variant: SamplingFeatures) -> int:
        """How many launched steps may stay unprocessed while `sched` launches: all of them when
        every row's unseen tokens are fed back on the device (`Request.feeds_back`), else 1
        (the newest, whose sampled ids the device holds); none for a variant that reads every
        request's token history on the host."""
        if variant.needs_history or not self._in_flight:
            return 0
        newest = {row.request for row in self._in_flight[-1].rows if row.num_sampled}
        if all(row.request.feeds_back(row.start, row.num_new_tokens, row.request in newest) for row in sched.scheduled):
            return len(self._in_flight)
        return 1

    def _process(self, out: ModelRunnerOutput) -> list[RequestOutput]:
        """Apply a finished step's sampled tokens (and prompt logprobs): the core's requests
        take the ids, the output side the text and logprobs."""
        touched: dict[str, list[RequestState]] = {}
        token_ids, logprobs = out.token_ids.T.tolist(), out.logprobs.T.tolist()  # [S][K], one conversion
        for i, row in enumerate(out.rows):
            seq = row.request
            if seq.is_finished:  # aborted, or finished by an earlier step: a wasted row
                continue
            state = self.states[seq.request_id][seq.index]
            if state.prompt_logprobs is not None and out.prompt_logprobs is not None:
                self.output.add_prompt_logprobs(state, out.prompt_logprobs, int(out.token_offsets[i]), row.start,
                                                row.num_new_tokens)
            prompt_tokens = max(0, min(row.num_new_tokens, seq.num_prompt_tokens - row.start))
            self.num_prompt_tokens += prompt_tokens if row.num_sampled else row.num_new_tokens
            if not row.num_sampled:  # a prompt chunk: nothing to sample yet
                continue
            k = 0
            for token in token_ids[i][:row.num_sampled]:  # tokens past a stop are dropped
                seq.append_token(token, self.eos_token_ids)
                k += 1
                if seq.is_finished:
                    break
            tops = None
            if state.logprobs is not None:  # ranks [K], top ids / logprobs [K, N] (these only if computed)
                tops = (out.ranks[:k, i], *((None, None) if out.top_ids is None else
                                             (out.top_ids[:k, i], out.top_logprobs[:k, i])))
            taken, stop = self.output.add_tokens(state, token_ids[i][:k], logprobs[i][:k], tops)
            self.num_generation_tokens += taken
            if stop is not None:
                seq.finish("stop", stop)
            elif seq.is_finished:
                state.finish(seq.finish_reason, seq.stop_reason)
            state.first_scheduled_time, state.num_cached_tokens = seq.first_scheduled_time, seq.num_cached_tokens
            touched.setdefault(seq.request_id, []).append(state)
        self.scheduler.commit([row.request for row in out.rows])
        outputs = []
        for request_id, stepped in touched.items():
            result = self.output.make_output(self.states[request_id], stepped)
            if result is not None:
                outputs.append(result)
            if all(s.is_finished for s in self.requests[request_id]):
                del self.requests[request_id], self.states[request_id]
        return outputs
