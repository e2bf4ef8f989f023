"""Continuous-batching scheduler: which sequences run this step, and how many tokens each.

vLLM V1's policy: one token budget per step; running sequences first (decodes and
continuing prefills, in admission order), then waiting ones FCFS; prompts longer than the
budget are chunked; when blocks run out, the newest running sequence is preempted and will
be recomputed. There is no prefill/decode distinction: each step a sequence computes the
tokens it has but whose KV is not yet cached. With `num_steps` > 1 (multi-step decode), a
step whose rows are all decodes reserves blocks for up to `num_steps` tokens per sequence
and runs that many iterations (`SchedulerOutput.steps`).
"""
from __future__ import annotations

import dataclasses
import time
from collections import deque

from jaxpaged.engine.block_manager import BlockManager
from jaxpaged.engine.sequence import Sequence, Status


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]]  # (sequence, number of new tokens this step)
    block_tables: list[list[int]]  # per scheduled sequence
    preempted: list[Sequence]
    steps: list[int] | None = None  # multi-step decode: iterations per row (None: one step)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    def without_finished(self) -> SchedulerOutput:
        """The rows of sequences still unfinished (others finished after scheduling: their
        blocks are already free)."""
        keep = [i for i, (seq, _) in enumerate(self.scheduled) if not seq.is_finished]
        return SchedulerOutput([self.scheduled[i] for i in keep], [self.block_tables[i] for i in keep],
                               self.preempted, self.steps and [self.steps[i] for i in keep])


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 num_steps: int = 1):
        self.bm = block_manager
        self.num_steps = num_steps
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING or seq.final_token_scheduled:
                continue  # preempted for an older sequence, or only waiting for its last token
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.bm.allocate(seq.seq_id, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                scheduled.append((seq, n))
                budget -= n
        if not preempted:
            self._admit(scheduled, budget)
        now = time.monotonic()
        for seq, _ in scheduled:
            seq.first_scheduled_time = seq.first_scheduled_time or now
        steps = self._lookahead(scheduled) if self.num_steps > 1 and not preempted else None
        tables = [self.bm.block_table(seq.seq_id) for seq, _ in scheduled]
        return SchedulerOutput(scheduled, tables, preempted, steps)

    def _lookahead(self, scheduled: list[tuple[Sequence, int]]) -> list[int] | None:
        """Iterations per row when every row is a decode (its one new token is its last) that
        the fast step variants serve: up to `num_steps`, fewer where max_tokens ends the
        sequence sooner, with blocks reserved for them; None (one step) otherwise or when the
        blocks are short (no preemption for lookahead)."""
        if not scheduled or any(n != 1 or seq.num_computed_tokens + 1 != seq.num_tokens
                                or seq.params.needs_full_step for seq, n in scheduled):
            return None
        steps = [min(self.num_steps, seq.max_tokens - seq.num_output_tokens) for seq, _ in scheduled]
        for (seq, _), k in zip(scheduled, steps):
            if not self.bm.allocate(seq.seq_id, seq.num_computed_tokens + k):
                return None
        return steps

    def _admit(self, scheduled: list[tuple[Sequence, int]], budget: int) -> None:
        """Move waiting sequences to running, FCFS, while budget, seats and blocks allow."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            parent = seq.fork_parent
            if parent is not None and not parent.is_finished:
                if parent.num_computed_tokens < parent.num_prompt_tokens:
                    break  # FCFS: wait until sample 0's prompt is in the cache, then share it
                computed = self.bm.fork(parent.seq_id, seq.seq_id, seq.num_prompt_tokens)
                blocks = None
            else:  # prompt logprobs need every prompt position computed (as vLLM)
                want = seq.params.prompt_logprobs is None
                blocks = self.bm.get_computed_blocks(seq.all_token_ids) if want else []
                computed = len(blocks) * self.bm.block_size
            n = min(seq.num_tokens - computed, budget)
            if not self.bm.allocate(seq.seq_id, computed + n, blocks):
                if blocks is None:
                    self.bm.free(seq.seq_id)  # undo the fork
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            seq.num_computed_tokens = seq.num_cached_tokens = computed
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it goes back to the front of the queue (recompute)."""
        self.running.remove(seq)
        self.bm.free(seq.seq_id)
        seq.status = Status.WAITING
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def advance(self, sched: SchedulerOutput) -> None:
        """A step was launched: its tokens' KV will be in the cache (with multi-step decode,
        also that of the tokens its iterations sample and feed back, all but the last)."""
        for i, (seq, n) in enumerate(sched.scheduled):
            seq.num_computed_tokens += sched.steps[i] if sched.steps else n

    def commit(self, seqs: list[Sequence]) -> None:
        """A step's tokens are known: cache the full blocks they complete, retire finished ones
        (also one preempted after its last token was launched: it finishes while waiting)."""
        for seq in seqs:
            if self.bm.holds(seq.seq_id):
                known = min(seq.num_computed_tokens, seq.num_tokens - seq.num_pending)
                self.bm.cache_blocks(seq.seq_id, seq.all_token_ids, known)
            if seq.is_finished:
                self.finish(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence from the queues and free its blocks (a waiting
        sequence holds none: never admitted, or preempted)."""
        if seq in self.running:
            self.running.remove(seq)
            self.bm.free(seq.seq_id)
        elif seq in self.waiting:
            self.waiting.remove(seq)
