"""Host-side tests of the scheduler's policy (no model): the token budget is used in full,
waiting requests are admitted FCFS, the newest running request is preempted when blocks run
out, and no step exceeds the budget. The steps are simulated as the engine runs them
synchronously: schedule, advance, sample a token for rows that reach their last token, commit."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from jaxpaged.engine.block_manager import BlockManager
from jaxpaged.engine.buckets import token_buckets
from jaxpaged.engine.sampling_params import SamplingParams
from jaxpaged.engine.scheduler import Scheduler
from jaxpaged.engine.request import Request, RequestStatus
from jaxpaged.engine.sample.features import features_of

BS = 4


def make_seq(name: str, prompt_len: int, max_tokens: int = 8, first_token: int = 0) -> Request:
    prompt = list(range(first_token, first_token + prompt_len))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return Request(name, 0, prompt, params, features_of(params, 512), max_tokens, seed=0)


def rows(out) -> list[tuple[Request, int]]:
    """(request, new tokens) of each row of a SchedulerOutput."""
    return [(r.request, r.num_new_tokens) for r in out.scheduled]


def make_scheduler(num_blocks=1024, max_num_seqs=64, budget=16, caching=False) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, enable_prefix_caching=caching), max_num_seqs, budget)


def finish_step(sched: Scheduler, out, token: int = 7) -> list[tuple[str, int]]:
    """Launch and complete a scheduled step; returns its [(request_id, n)]."""
    sched.advance(out)
    for row, (seq, _) in enumerate(rows(out)):
        if seq.num_computed_tokens == seq.num_tokens:  # its last token computed: one is sampled
            seq.add_pending(row)
            seq.append_token(token, ())
    sched.commit([seq for seq, _ in rows(out)])
    return [(seq.request_id, n) for seq, n in rows(out)]


def step(sched: Scheduler, token: int = 7):
    """One synchronous engine step; returns the scheduler output and [(request_id, n)]."""
    out = sched.schedule()
    return out, finish_step(sched, out, token)


# ---- (a) the budget is used in full when work is waiting ---------------------------------
def test_waiting_prompts_fill_the_budget_exactly_chunking_the_last():
    sched = make_scheduler(budget=16)
    for name, n in (("a", 7), ("b", 8), ("c", 9)):  # 24 tokens > 16: c is chunked to 1 token
        sched.add(make_seq(name, n))
    out, rows = step(sched)
    assert rows == [("a", 7), ("b", 8), ("c", 1)]
    assert out.num_tokens == 16 and out.preempted == []
    assert [s.request_id for s in sched.running] == ["a", "b", "c"] and not sched.waiting
    # a and b sampled their first token; c continues its prompt with what is left after decodes
    out, rows = step(sched)
    assert rows == [("a", 1), ("b", 1), ("c", 8)] and out.num_tokens == 10  # nothing else waits


def test_decodes_plus_chunked_prefills_sum_to_the_budget():
    sched = make_scheduler(budget=64)
    for i in range(3):
        sched.add(make_seq(f"d{i}", 5, max_tokens=20))
    step(sched)  # the three prompts, each samples a token
    sched.add(make_seq("p", 30))
    sched.add(make_seq("q", 40))
    out, rows = step(sched)
    assert rows == [("d0", 1), ("d1", 1), ("d2", 1), ("p", 30), ("q", 31)]
    assert out.num_tokens == 64
    out, rows = step(sched)  # q's chunk continues after the 4 decodes (p sampled its first token)
    assert rows == [("d0", 1), ("d1", 1), ("d2", 1), ("p", 1), ("q", 9)]


def test_a_long_prompt_is_chunked_at_the_budget():
    sched = make_scheduler(budget=16)
    sched.add(make_seq("long", 40))
    assert [step(sched)[1] for _ in range(4)] == [[("long", 16)], [("long", 16)], [("long", 8)], [("long", 1)]]


# ---- (b) FCFS admission --------------------------------------------------------------------
def test_admission_is_in_arrival_order_up_to_the_seats():
    sched = make_scheduler(max_num_seqs=2, budget=64)
    for name in "abc":
        sched.add(make_seq(name, 5))
    out, rows = step(sched)
    assert rows == [("a", 5), ("b", 5)]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_a_later_request_is_not_admitted_before_an_earlier_one_that_does_not_fit():
    sched = make_scheduler(num_blocks=9, budget=64)  # 8 usable blocks
    sched.add(make_seq("r", 16))
    step(sched)  # r: 4 blocks, one output token
    sched.add(make_seq("big", 24))  # 6 blocks: only 3 are left once r grows to its 5th block
    sched.add(make_seq("small", 4))  # 1 block: would fit
    out, rows = step(sched)
    assert rows == [("r", 1)]
    assert [s.request_id for s in sched.waiting] == ["big", "small"]
    assert all(s.status is RequestStatus.WAITING for s in sched.waiting)
    assert not sched.bm.holds(sched.waiting[0].seq_id) and not sched.bm.holds(sched.waiting[1].seq_id)


# ---- (c) the newest running request is preempted ------------------------------------------
def test_the_newest_running_request_is_preempted_and_requeued_first():
    sched = make_scheduler(num_blocks=7, budget=64)  # 6 usable blocks
    for name in "abc":
        sched.add(make_seq(name, 8))  # 2 blocks each
    sched.add(make_seq("d", 4))
    out, rows = step(sched)
    assert rows == [("a", 8), ("b", 8), ("c", 8)] and sched.bm.num_free_blocks == 0
    a, b, c = sched.running
    # each has 9 tokens now and needs a 3rd block: only c's two blocks can provide them
    out, rows = step(sched)
    assert out.preempted == [c] and rows == [("a", 1), ("b", 1)]
    assert c.status is RequestStatus.WAITING and c.num_computed_tokens == 0 and not sched.bm.holds(c.seq_id)
    assert c.num_tokens == 9  # its output token is kept (recomputed with the prompt)
    assert [s.request_id for s in sched.waiting] == ["c", "d"]
    assert sched.running == [a, b] and sched.num_preemptions == 1
    assert [len(sched.bm.block_table(s.seq_id)) for s in (a, b)] == [3, 3] and sched.bm.num_free_blocks == 0


def test_prefix_cache_stats_count_each_admission_once_and_preempted_ones_apart():
    """As vLLM's `prefix_cache_queries` / `_hits`: a waiting request's lookup counts once, when it
    is admitted (not on every step it waits for blocks), and a preempted request's re-admission,
    which finds its own blocks, counts apart (`preempted_prefix_cache_*`)."""
    sched = make_scheduler(num_blocks=7, budget=64, caching=True)  # 6 usable blocks
    seqs = [make_seq(name, 8, 6, first_token=first) for name, first in zip("abc", (0, 100, 200))]
    seqs.append(make_seq("d", 12, 2, first_token=300))  # distinct prompts: new requests never hit
    for seq in seqs:
        sched.add(seq)
    expected = {False: [0, 0], True: [0, 0]}  # preempted before? -> [queries, hits], from the admissions seen
    waiting_steps, preempted = 0, set()
    while sched.waiting or sched.running:
        before = {s.seq_id: (s.status, s.num_tokens) for s in seqs}
        out, _ = step(sched)
        for s in seqs:
            status, num_tokens = before[s.seq_id]
            if status is RequestStatus.WAITING and s.seq_id in {r.request.seq_id for r in out.scheduled}:
                expected[s.seq_id in preempted][0] += num_tokens
                expected[s.seq_id in preempted][1] += s.num_cached_tokens
        preempted |= {s.seq_id for s in out.preempted}
        waiting_steps += len(sched.waiting)
    bm = sched.bm
    assert preempted and waiting_steps > len(seqs)  # requests waited several steps
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == tuple(expected[False]) == (36, 0)
    assert (bm.preempted_prefix_cache_queries, bm.preempted_prefix_cache_hits) == tuple(expected[True])
    assert bm.preempted_prefix_cache_hits >= 2 * BS  # a re-admission found its own prompt's blocks


# ---- (d) randomized runs -------------------------------------------------------------------
class Model:
    """Independent model of the policy with blocks to spare: running rows first (admission
    order), each taking min(its uncomputed tokens, budget left); then waiting ones FCFS while
    budget and seats remain. A row that reaches its last token samples one."""

    def __init__(self, budget: int, max_num_seqs: int):
        self.budget, self.max_num_seqs = budget, max_num_seqs
        self.running: list[list] = []  # [name, total tokens, computed, outputs, max_tokens]
        self.waiting: list[list] = []

    def add(self, name, prompt_len, max_tokens):
        self.waiting.append([name, prompt_len, 0, 0, max_tokens])

    def step(self) -> list[tuple[str, int]]:
        left, rows = self.budget, []
        for r in self.running:
            if left == 0:
                break
            n = min(r[1] - r[2], left)
            rows.append((r, n))
            left -= n
        while self.waiting and left > 0 and len(self.running) < self.max_num_seqs:
            r = self.waiting.pop(0)
            self.running.append(r)
            n = min(r[1] - r[2], left)
            rows.append((r, n))
            left -= n
        for r, n in rows:
            r[2] += n
            if r[2] == r[1]:
                r[1] += 1
                r[3] += 1
                if r[3] == r[4]:
                    self.running.remove(r)
        return [(r[0], n) for r, n in rows]


@pytest.mark.parametrize("seed", range(6))
def test_random_arrivals_follow_the_model(seed):
    rng = np.random.default_rng(seed)
    budget = int(rng.choice([8, 16, 32]))
    max_num_seqs = int(rng.integers(2, 9))
    sched = make_scheduler(num_blocks=4096, max_num_seqs=max_num_seqs, budget=budget)
    model = Model(budget, max_num_seqs)
    full = 0
    for t in range(2000):
        if t >= 300 and not (sched.running or sched.waiting):
            break
        if t < 300 and rng.random() < 0.3:
            for _ in range(int(rng.integers(1, 4))):
                name, n, m = f"r{t}-{_}", int(rng.integers(1, 3 * budget)), int(rng.integers(1, 10))
                sched.add(make_seq(name, n, m))
                model.add(name, n, m)
        out, rows = step(sched)
        assert rows == model.step(), f"step {t}"
        assert out.preempted == []
        assert all(0 < n <= budget for _, n in rows) and out.num_tokens <= budget
        full += out.num_tokens == budget
    assert not sched.running and not sched.waiting
    assert full > 10  # the runs did fill the budget often
    assert sched.bm.num_free_blocks == sched.bm.num_total_blocks


@pytest.mark.parametrize("seed", range(6))
def test_random_runs_with_scarce_blocks_preempt_the_newest_and_never_exceed_the_budget(seed):
    rng = np.random.default_rng(100 + seed)
    budget = int(rng.choice([8, 16, 32]))
    max_num_seqs = int(rng.integers(3, 9))
    num_blocks = int(rng.integers(12, 24))
    sched = make_scheduler(num_blocks=num_blocks, max_num_seqs=max_num_seqs, budget=budget,
                           caching=bool(seed % 2))
    bm = sched.bm
    pending = []
    for i in range(40):
        n = int(rng.integers(1, min(2 * budget, (num_blocks - 1) * BS - 4)))
        m = min(int(rng.integers(1, 24)), (num_blocks - 1) * BS - n)  # every request fits the pool alone
        pending.append(make_seq(f"r{i}", n, m, first_token=int(rng.integers(0, 3)) * 100))
    admitted_at: dict[int, int] = {}  # seq_id -> step of its latest admission
    preemptions = 0
    for t in range(2000):
        if pending and rng.random() < 0.4:
            sched.add(pending.pop(0))
        if not (pending or sched.running or sched.waiting):
            break
        running_before = list(sched.running)
        out = sched.schedule()
        total = out.num_tokens
        assert all(0 < n <= budget for _, n in rows(out)) and total <= budget
        if out.preempted:
            preemptions += len(out.preempted)
            # the victims are the newest running ones, newest first
            by_age = sorted(running_before, key=lambda s: (admitted_at[s.seq_id], running_before.index(s)))
            assert out.preempted == by_age[::-1][:len(out.preempted)]
            assert list(sched.waiting)[:len(out.preempted)] == out.preempted[::-1]  # oldest first
            assert all(not bm.holds(s.seq_id) and s.num_computed_tokens == 0 for s in out.preempted)
        elif total < budget and sched.waiting and len(sched.running) < max_num_seqs:
            # no waste: the budget is left unused only if the queue's head does not fit the blocks
            head, left = sched.waiting[0], budget - total
            trial = copy.deepcopy(bm)
            blocks = trial.get_computed_blocks(head.all_token_ids)
            cached = len(blocks) * BS
            assert not trial.allocate(head.seq_id, cached + min(head.num_tokens - cached, left), blocks)
        for seq, _ in rows(out):
            if seq not in running_before:
                admitted_at[seq.seq_id] = t
        finish_step(sched, out)
        assert len(sched.running) <= max_num_seqs
    else:
        raise AssertionError("the run did not finish")
    assert preemptions > 0
    assert bm.num_free_blocks == bm.num_total_blocks


def test_long_prefill_token_threshold_caps_each_prompt_not_the_step():
    """vLLM's long_prefill_token_threshold: a prompt takes at most that many tokens of a step,
    so a step beside running decodes stays short; several prompts still share the budget."""
    sched = Scheduler(BlockManager(1024, BS, enable_prefix_caching=False), 64, 64, long_prefill_token_threshold=8)
    sched.add(make_seq("d", 3, max_tokens=20))
    step(sched)  # d samples its first token: a decode from now on
    for name, n in (("a", 20), ("b", 5), ("c", 30)):
        sched.add(make_seq(name, n))
    out, rows = step(sched)
    assert rows == [("d", 1), ("a", 8), ("b", 5), ("c", 8)]
    out, rows = step(sched)
    assert rows == [("d", 1), ("a", 8), ("b", 1), ("c", 8)]
    out, rows = step(sched)
    assert rows == [("d", 1), ("a", 4), ("b", 1), ("c", 8)]
    # alone, a long prompt still goes in chunks of the threshold, not of the budget
    sched = Scheduler(BlockManager(1024, BS, enable_prefix_caching=False), 64, 64, long_prefill_token_threshold=24)
    sched.add(make_seq("e", 50))
    out, done = step(sched)
    assert done == [("e", 24)]


def test_decoding_token_budget_caps_the_step_until_a_backlog():
    """With decodes running, a step takes at most `decoding_token_budget` tokens in all while
    the prompt tokens still to compute fit in one budget; a larger backlog gets the whole budget;
    with no decode running the cap does not apply."""
    sched = Scheduler(BlockManager(1024, BS, enable_prefix_caching=False), 64, 64, decoding_token_budget=10)
    sched.add(make_seq("a", 30, max_tokens=20))
    assert step(sched)[1] == [("a", 30)]  # no decode running: the whole budget
    for name, n in (("b", 7), ("c", 12)):
        sched.add(make_seq(name, n))
    assert step(sched)[1] == [("a", 1), ("b", 7), ("c", 2)]  # 10 tokens with a's decode
    assert step(sched)[1] == [("a", 1), ("b", 1), ("c", 8)]
    for name in "defgh":  # 5 x 20 prompt tokens waiting: more than one budget (64)
        sched.add(make_seq(name, 20))
    rows = step(sched)[1]
    assert rows[:3] == [("a", 1), ("b", 1), ("c", 2)] and sum(n for _, n in rows) == 64


def test_decoding_token_budget_is_a_token_bucket():
    """Its steps are not padded to the next bucket: the default rule compiles it too."""
    assert 384 not in token_buckets(2048, 256)
    assert 384 in token_buckets(2048, 256, extra=(384,))
    assert token_buckets(2048, 256, sizes=(64, 512), extra=(384,)) == [64, 512, 2048]
