"""Which sequences run this step, and how many of their tokens: iteration-level batching under a token budget.

Running sequences go first (oldest first), so decodes are never starved by new prompts; waiting sequences are
admitted while the budget and the sequence cap allow. With chunked prefill a long prompt takes whatever budget
is left and continues next step. When blocks run out the newest running sequence is preempted by recompute:
its blocks are freed and it goes back to the front of the queue with all its tokens, to be recomputed later.

Waiting sequences own no cache blocks, not even for prompt blocks received from another process (decode): those
are loaded at admission into blocks allocated with the rest (engine/kv_connector.py), so a waiter that cannot run
never holds memory the queue's head or the running batch needs. A load that fails is computed instead.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.kv_connector import KVLoads
from splitserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        kv_loads: KVLoads,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool,
    ):
        self.kv = kv
        self.kv_loads = kv_loads
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled_running: list[Sequence] = []

        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = self._tokens_to_run(seq, budget)
            if num_new == 0:
                i += 1
                continue
            while not self.kv.allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break  # preempted itself: nothing after it can run either
            scheduled_running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
            i += 1

        # After a preemption memory is short: admitting more would only preempt again.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            hit = self.kv.admit_cached_prefix(seq)
            loaded = self.kv_loads.tokens_to_load(seq)
            seq.num_computed_tokens += loaded  # their blocks are allocated below with the rest
            num_new = self._tokens_to_run(seq, budget)
            if num_new == 0 or not self.kv.allocate(seq, num_new):
                self._undo_admission(seq)
                break
            self.kv.record_prefix_query(seq, hit)
            self.kv_loads.schedule(seq, loaded)
            seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch

    def _tokens_to_run(self, seq: Sequence, budget: int) -> int:
        remaining = seq.num_uncomputed_tokens
        if remaining <= budget:
            return remaining
        if self.enable_chunked_prefill:
            return budget
        # Unchunked: a prompt larger than the budget runs alone in its own step rather than never.
        return remaining if budget == self.max_num_batched_tokens else 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def compute_instead(self, seq: Sequence, num_tokens: int) -> None:
        """The last `num_tokens` of a sequence's computed tokens were to be loaded this step and could not be:
        it computes them from where the load began (its blocks are already allocated). Its entry in this step's
        batch stays as scheduled, now a chunk starting there."""
        seq.num_computed_tokens -= num_tokens
        seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)

    def _undo_admission(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_computed_tokens = 0

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.kv_loads.finish(seq)
        self.kv.free(seq)
