"""Continuous-batching scheduler: which sequences run this step, and how many tokens each.

vLLM V1's policy: one token budget per step; running sequences first (decodes and
continuing prefills, in admission order), then waiting ones FCFS; prompts longer than the
budget are chunked, and with `long_prefill_token_threshold` no prompt takes more than that
many tokens of one step (so a step that carries decodes stays short, while several waiting
prompts still fill the budget together). With `decoding_token_budget`, a step that carries
decodes takes at most that many tokens in all (prompts at least a quarter of it) while the
prompt tokens still to compute fit in one budget (inter-token latency near a decode step's);
a longer backlog gets the whole budget (throughput). When blocks run out, the newest running
sequence is preempted and will be recomputed. There is no prefill/decode distinction: each step a sequence computes the
tokens it has but whose KV is not yet cached. With `num_steps` > 1 (multi-step decode), a
step whose rows are all decodes reserves blocks for up to `num_steps` tokens per sequence
and runs that many iterations (`SchedulerOutput.multi_step`, `ScheduledRequest.num_sampled`).
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from typing import TYPE_CHECKING

from jaxpaged.engine.block_manager import BlockManager
from jaxpaged.engine.request import Request, RequestStatus
from jaxpaged.engine.sample.features import union
from jaxpaged.engine.scheduler_output import ScheduledRequest, SchedulerOutput
from jaxpaged.engine.spec_decode.ngram_proposer import VERIFIABLE

if TYPE_CHECKING:
    from jaxpaged.engine.spec_decode.drafter import Drafter


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 num_steps: int = 1, long_prefill_token_threshold: int = 0, decoding_token_budget: int = 0,
                 drafter: Drafter | None = None):
        self.bm = block_manager
        self.drafter = drafter  # speculative decoding: draft tokens for decoding rows
        self.chunk_cap = long_prefill_token_threshold or max_num_batched_tokens  # tokens per prompt per step
        self.decoding_token_budget = decoding_token_budget
        self.num_steps = num_steps
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, seq: Request) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        prefill_budget = self._prefill_budget()
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        drafter = self.drafter if self.drafter is not None and self.drafter.speculates(len(self.running)) else None
        drafts: dict[Request, list[int]] = {}
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not RequestStatus.RUNNING or seq.final_token_scheduled:
                continue  # preempted for an older sequence, or only waiting for its last token
            n = min(seq.num_tokens - seq.num_computed_tokens, budget, self.chunk_cap)
            if n > 1:  # a prompt chunk (or a preempted sequence's recompute)
                n = min(n, prefill_budget)
                prefill_budget -= n
            if n == 0:
                continue  # a prompt-only request (max_tokens 0) whose last chunk is launched
            if drafter is not None and n == 1 and (d := drafter.propose(seq, budget - 1)):
                drafts[seq] = d
                n += len(d)
            while not self.bm.allocate(seq.seq_id, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is RequestStatus.RUNNING:
                scheduled.append((seq, n))
                budget -= n
        if not preempted:
            self._admit(scheduled, min(budget, prefill_budget))
        if drafts and not VERIFIABLE.covers(union(seq.features for seq, _ in scheduled)):
            # a row's sampling is beyond the verify head's: no speculation this step
            scheduled = [(seq, n - len(drafts.pop(seq, []))) for seq, n in scheduled]
        now = time.monotonic()
        for seq, _ in scheduled:
            seq.first_scheduled_time = seq.first_scheduled_time or now
        steps = self._lookahead(scheduled) if self.num_steps > 1 and not preempted else None
        rows = [ScheduledRequest.of(seq, n, self.bm.block_table(seq.seq_id), steps[i] if steps else 1, drafts.get(seq))
                for i, (seq, n) in enumerate(scheduled)]
        return SchedulerOutput(rows, preempted, steps is not None)

    def _prefill_budget(self) -> int:
        """Prompt tokens this step may take: what `decoding_token_budget` leaves beside the
        decodes (at least a quarter of it) while some running sequence is past its prompt and
        the prompt tokens still to compute fit in one budget; else the whole budget."""
        cap, budget = self.decoding_token_budget, self.max_num_batched_tokens
        decodes = sum(s.num_computed_tokens >= s.num_prompt_tokens for s in self.running) if cap else 0
        if not decodes:
            return budget
        backlog = 0
        for seq in itertools.chain(self.running, self.waiting):
            backlog += seq.num_tokens - seq.num_computed_tokens - 1
            if backlog > budget:
                return budget
        return max(cap - decodes, cap // 4)

    def _lookahead(self, scheduled: list[tuple[Request, int]]) -> list[int] | None:
        """Iterations per row when every row is a decode (its one new token is its last) that
        the decode loop serves: up to `num_steps`, fewer where max_tokens ends the sequence
        sooner, with blocks reserved for them; None (one step) otherwise or when the blocks are
        short (no preemption for lookahead)."""
        if not scheduled or any(n != 1 or seq.num_computed_tokens + 1 != seq.num_tokens
                                or not seq.features.in_decode_loop for seq, n in scheduled):
            return None
        steps = [min(self.num_steps, seq.max_tokens - seq.num_output_tokens) for seq, _ in scheduled]
        for (seq, _), k in zip(scheduled, steps):
            if not self.bm.allocate(seq.seq_id, seq.num_computed_tokens + k):
                return None
        return steps

    def _admit(self, scheduled: list[tuple[Request, int]], budget: int) -> None:
        """Move waiting sequences to running, FCFS, while budget, seats and blocks allow; those
        whose grammar is still compiling are passed over and keep their place."""
        compiling: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.structured_output is not None and not seq.structured_output.ready:
                compiling.append(self.waiting.popleft())
                continue
            parent = seq.fork_parent
            if parent is not None and not parent.is_finished:
                if parent.num_computed_tokens < parent.num_prompt_tokens:
                    break  # FCFS: wait until sample 0's prompt is in the cache, then share it
                computed = self.bm.fork(parent.seq_id, seq.seq_id, seq.num_prompt_tokens)
                blocks, want = None, False  # shares sample 0's blocks: no lookup
            else:  # prompt logprobs need every prompt position computed (as vLLM)
                want = seq.params.prompt_logprobs is None
                blocks = self.bm.get_computed_blocks(seq.all_token_ids, seq.cache_salt) if want else []
                computed = len(blocks) * self.bm.block_size
            n = min(seq.num_tokens - computed, budget, self.chunk_cap)
            if not self.bm.allocate(seq.seq_id, computed + n, blocks):
                if blocks is None:
                    self.bm.free(seq.seq_id)  # undo the fork
                break
            self.waiting.popleft()
            if want:  # the lookup counted once, when admitted (not per failed try)
                self.bm.record_lookup(seq.num_tokens, len(blocks), preempted=seq.num_preemptions > 0)
            seq.status = RequestStatus.RUNNING
            seq.num_computed_tokens = seq.num_cached_tokens = seq.num_draft_computed_tokens = computed
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(compiling))

    def _preempt(self, seq: Request) -> None:
        """Free the sequence's blocks; it goes back to the front of the queue (recompute)."""
        self.running.remove(seq)
        self.bm.free(seq.seq_id)
        seq.status = RequestStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def advance(self, sched: SchedulerOutput) -> None:
        """A step was launched: its tokens' KV will be in the cache (with multi-step decode,
        also that of the tokens its iterations sample and feed back, all but the last)."""
        for row in sched.scheduled:
            row.request.num_computed_tokens += row.num_sampled if sched.multi_step else row.num_new_tokens

    def reject_drafts(self, seq: Request, num_rejected: int) -> None:
        """Speculation: the KV of `num_rejected` draft positions is wrong; move the computed
        count back (their slots are overwritten later) and free blocks wholly past the tokens."""
        seq.num_computed_tokens -= num_rejected
        self.bm.trim(seq.seq_id, seq.num_tokens)

    def commit(self, seqs: list[Request]) -> None:
        """A step's tokens are known: cache the full blocks they complete, retire finished ones
        (also one preempted after its last token was launched: it finishes while waiting)."""
        for seq in seqs:
            if self.bm.holds(seq.seq_id):
                known = min(seq.num_computed_tokens, seq.num_known_tokens)
                self.bm.cache_blocks(seq.seq_id, seq.all_token_ids, known, seq.cache_salt)
            if seq.is_finished:
                self.finish(seq)

    def finish(self, seq: Request) -> None:
        """Drop a finished or aborted sequence from the queues and free its blocks (a waiting
        sequence holds none: never admitted, or preempted)."""
        if seq in self.running:
            self.running.remove(seq)
            self.bm.free(seq.seq_id)
        elif seq in self.waiting:
            self.waiting.remove(seq)
