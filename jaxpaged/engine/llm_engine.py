"""The engine loop: requests in, one scheduled step at a time, `RequestOutput`s out.

    Scheduler.schedule() -> ModelRunner.launch()       step n+1 dispatched, then for step n-1:
    ModelRunner.fetch() -> LLMEngine._process() -> Scheduler.commit(), OutputProcessor
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
from jaxpaged.engine.detokenizer import IncrementalDetokenizer
from jaxpaged.engine.mesh import init_distributed, make_mesh, shard_attention
from jaxpaged.engine.model_runner import Launched, ModelRunner
from jaxpaged.engine.output_processor import OutputProcessor
from jaxpaged.engine.outputs import RequestOutput
from jaxpaged.engine.sampling_params import SamplingParams
from jaxpaged.engine.scheduler import Scheduler, SchedulerOutput
from jaxpaged.engine.sequence import Sequence
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
        self.requests: dict[str, list[Sequence]] = {}
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
            limit, in_use = budget
            free = limit * self.config.gpu_memory_utilization - in_use - reserve
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
        base_seed = params.seed if params.seed is not None else int(self._rng.integers(2**63))
        seqs = []
        for i in range(params.n):
            detok = (IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens,
                                            params.spaces_between_special_tokens)
                     if self.tokenizer is not None and params.detokenize else None)
            seq = Sequence(request_id, i, prompt if isinstance(prompt, str) else None, ids, params,
                           max_tokens, base_seed + i, detok, arrival_time)
            seq.fork_parent = seqs[0] if seqs else None
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = seqs
        return ids

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its blocks (unknown or finished ids are ignored)."""
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
        mode = self.runner.step_mode(sched)
        outputs = []
        keep = self._steps_kept(sched, mode)
        if len(self._in_flight) > keep:
            outputs += self._process_oldest(len(self._in_flight) - keep)
            sched = sched.without_finished()  # e.g. a stop string found in a step just processed
        if sched.scheduled:
            launched = self.runner.launch(sched, mode)
            self.scheduler.advance(sched)
            for row, (seq, _, _, samples) in enumerate(launched.rows):
                for _ in range(sched.steps[row] if sched.steps else int(samples)):
                    seq.add_pending(row)
            self._in_flight.append(launched)
        done = len(self._in_flight) - self._depth if sched.scheduled else min(len(self._in_flight), 1)
        return outputs + self._process_oldest(done)

    def _process_oldest(self, n: int) -> list[RequestOutput]:
        """Process the `n` oldest launched steps (none if n <= 0)."""
        return [out for _ in range(n) for out in self._process(self._in_flight.popleft())]

    def _steps_kept(self, sched: SchedulerOutput, mode: str) -> int:
        """How many launched steps may stay unprocessed while `sched` launches. A row reads a
        pending (sampled, not yet seen) token only as its last token and only from the newest
        step, whose ids the device feeds back; other pending tokens must reach the host first
        (e.g. a sequence the token budget skipped for a step, or one recomputed after a
        preemption), and the `full` variant reads every request's token history."""
        if mode == "full" or not self._in_flight:
            return 0
        newest = {seq for seq, _, _, samples in self._in_flight[-1].rows if samples}
        for seq, n in sched.scheduled:
            end = seq.num_computed_tokens + n
            unseen = end - max(seq.num_tokens - seq.num_pending, seq.num_computed_tokens)
            if unseen > 1 or (unseen == 1 and (end != seq.num_tokens or seq not in newest)):
                return 1
        return len(self._in_flight)

    def _process(self, launched: Launched) -> list[RequestOutput]:
        """Apply a finished step's sampled tokens (and prompt logprobs) to its sequences."""
        step = self.runner.fetch(launched)
        sampled = step.sampled
        touched: dict[str, list[Sequence]] = {}
        for i, (seq, start, n, samples) in enumerate(step.rows):
            if seq.is_finished:  # aborted, or finished by an earlier step: a wasted row
                continue
            if seq.prompt_logprobs is not None and step.prompt is not None:
                self.output.add_prompt_logprobs(seq, step.prompt, int(step.token_offsets[i]), start, n)
            if not samples:  # a prompt chunk: nothing to sample yet
                self.num_prompt_tokens += n
                continue
            self.num_prompt_tokens += max(0, min(n, seq.num_prompt_tokens - start))
            for j in range(step.steps[i] if step.steps else 1):  # tokens past a stop are dropped
                if seq.is_finished:
                    break
                token = int(sampled.token_ids[j, i])
                top = None
                if seq.logprobs is not None:  # top-N arrays only in the (single-step) `full` variant
                    tops = (None, None) if sampled.top_ids is None else (sampled.top_ids[j], sampled.top_logprobs[j])
                    top = self.output.logprobs_entry(token, sampled.logprobs[j, i], sampled.ranks[j, i], *tops, i,
                                                     seq.params.logprobs)
                seq.append_token(token, float(sampled.logprobs[j, i]), top, self.eos_token_ids)
                self.num_generation_tokens += 1
            touched.setdefault(seq.request_id, []).append(seq)
        self.scheduler.commit([seq for seq, _, _, _ in step.rows])
        outputs = []
        for request_id, stepped in touched.items():
            seqs = self.requests[request_id]
            out = self.output.make_output(seqs, stepped)
            if out is not None:
                outputs.append(out)
            if all(s.is_finished for s in seqs):
                del self.requests[request_id]
        return outputs
