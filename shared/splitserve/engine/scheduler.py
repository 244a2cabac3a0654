"""Which sequences run this step, and how many of their tokens: iteration-level batching under a token budget.

Running sequences go first (oldest first), so decodes are never starved by new prompts; waiting sequences are
admitted while the budget and the sequence cap allow. With chunked prefill a long prompt takes whatever budget
is left and continues next step. When blocks run out the newest running sequence is preempted by recompute:
its blocks are freed and it goes back to the front of the queue with all its tokens, to be recomputed later.

Waiting sequences may hold blocks imported from a kv-store (decode). Those holds are the first thing given up
when blocks run short, newest waiter first: the blocks stay in the prefix cache, so a waiter whose blocks were not
evicted meanwhile still finds them at admission, and one whose blocks were evicted recomputes them. Holding them
instead would let waiters that cannot run starve the ones that can (the queue's head, the running batch).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)


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
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool,
    ):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_held_blocks_released = 0

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
            while not self._allocate(seq, num_new):
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
            self.kv.admit_cached_prefix(seq)
            num_new = self._tokens_to_run(seq, budget)
            if num_new == 0 or not self._allocate(seq, num_new, keep=seq):
                self._undo_admission(seq)
                break
            self.kv.record_prefix_query(seq)
            self.kv.release_held(seq)  # the prefix lookup above took its own references
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

    def _allocate(self, seq: Sequence, num_new: int, keep: Optional[Sequence] = None) -> bool:
        """Grows `seq` by `num_new` tokens' blocks, letting waiters' holds (but `keep`'s) go if that is what it
        takes; False when even that leaves too few."""
        while not self.kv.allocate(seq, num_new):
            if not self._release_waiting_holds(self.kv.blocks_needed(seq, num_new), keep=keep):
                return False
        return True

    def _release_waiting_holds(self, num_blocks: int, keep: Optional[Sequence] = None) -> bool:
        """Lets go of waiting sequences' imported blocks, newest waiter first, until `num_blocks` are free.

        Returns whether any hold was released (the caller then retries its allocation).
        """
        released = False
        for seq in reversed(self.waiting):
            if self.kv.can_allocate(num_blocks):
                break
            if seq is keep or not seq.held_block_ids:
                continue
            self.num_held_blocks_released += len(seq.held_block_ids)
            log.info("request %s: releasing %d imported KV blocks while it waits (cache full); they stay cached "
                     "until evicted", seq.request_id, len(seq.held_block_ids))
            self.kv.release_held(seq)
            released = True
        return released

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

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
        self.kv.release_held(seq)
        self.kv.free(seq)
