"""The engine's one port for KV that moves between processes, in the spirit of vLLM's KV connector: the engine
states what it needs and never sees a transport, a store or a pin.

- Saving: `export_kv` on a request says what to save when it finishes (a KVExport); saved blocks go out as copied
  rows, or lent in place (`LLMEngine.lend_exports`) until the saver releases them.
- Loading, scheduler side: a request may come with prompt blocks received from elsewhere (a KVLoad). While it
  waits it owns no cache blocks; at admission the scheduler asks `KVLoads.tokens_to_load` how many prompt
  tokens beyond its local prefix-cache hit can be loaded, allocates blocks for them with the rest, and hands
  them to `KVLoads.schedule`.
- Loading, worker side: before the step's forward pass `KVLoads.load` copies the rows into exactly those blocks
  through ReceivedKV.read and reports each load's outcome through its `on_done`, so whoever keeps the rows
  readable (a kv-store's pin, owned by the transport that made the ReceivedKV) ends it as soon as it is no longer
  needed. A read that cannot be trusted raises KVLoadError; the scheduler then computes those tokens instead.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Protocol

if TYPE_CHECKING:
    import torch

    from splitserve.engine.sequence import Sequence

log = logging.getLogger(__name__)

# Rows as they arrived: (index of the first row, uint8 view `[k, bytes_per_block]`) per contiguous run.
Runs = list[tuple[int, "torch.Tensor"]]
# Writes received rows into cache blocks: (block ids, the row each one gets, the runs those rows lie in).
WriteRows = Callable[[list[int], list[int], Runs], None]


class KVLoadError(RuntimeError):
    """Received rows could not be copied in a way that can be trusted (their source was given back first, or
    stopped being guaranteed before the copy ended); the engine computes those blocks instead."""


class ReceivedKV(Protocol):
    """The leading `count` rows of a run of a prompt's blocks, received from another process for one request."""

    count: int

    def read(self, write: Callable[[Runs], None]) -> None:
        """Calls `write(runs)` once, while the rows are readable; raises KVLoadError if what was written cannot
        be trusted (the caller must then drop it)."""
        ...

    def seconds_left(self) -> float:
        """How long the rows stay readable (math.inf when nothing ends that)."""
        ...


class RowsInMemory:
    """Rows this process owns (a uint8 tensor `[n, bytes_per_block]`): always readable."""

    def __init__(self, rows: "torch.Tensor"):
        self.count = rows.shape[0]
        self._rows = rows

    def read(self, write: Callable[[Runs], None]) -> None:
        write([(0, self._rows)] if self.count else [])

    def seconds_left(self) -> float:
        return math.inf


def _no_one_waits(error: Optional[str]) -> None:
    pass


@dataclass
class KVLoad:
    """Prompt blocks received for one request: `hashes` name the rows of `source`, a run of the prompt's own
    block hashes (not necessarily from its first block: a worker pulls only what it lacks).

    `on_done(error)` is called once, on the engine's thread, when the engine no longer needs the rows: `None`
    when they are in the cache (or the request ended first), else why those tokens are computed instead.
    """

    hashes: list[bytes]
    source: ReceivedKV
    on_done: Callable[[Optional[str]], None] = field(default=_no_one_waits)

    def __post_init__(self) -> None:
        if not hasattr(self.source, "read"):  # plain rows in this process's memory
            self.source = RowsInMemory(self.source)


@dataclass
class _Scheduled:
    seq: "Sequence"
    load: KVLoad
    block_ids: list[int]
    rows: list[int]


class KVLoads:
    """Which waiting sequences have received blocks, and which of them load this step. The only owner of both."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._waiting: dict[int, KVLoad] = {}  # by seq_id
        self._scheduled: list[_Scheduled] = []
        self.num_failures = 0

    def add(self, seq: "Sequence", load: KVLoad) -> None:
        self._waiting[seq.seq_id] = load

    # ---- scheduler side --------------------------------------------------------------------------------------

    def tokens_to_load(self, seq: "Sequence") -> int:
        """How many prompt tokens after `seq.num_computed_tokens` (its local prefix hit, block-aligned) the
        received rows can supply: the part of their run that names this prompt's own blocks and starts no later
        than the hit ends, stopping before the block of the last token (its logits pick the next token)."""
        load = self._waiting.get(seq.seq_id)
        if load is None or not load.hashes:
            return 0
        first = seq.num_computed_tokens // self.block_size
        try:
            offset = seq.block_hashes.index(load.hashes[0])
        except ValueError:
            return 0
        end = offset
        limit = min(offset + load.source.count, len(load.hashes) + offset, (seq.num_tokens - 1) // self.block_size,
                    len(seq.block_hashes))
        while end < limit and seq.block_hashes[end] == load.hashes[end - offset]:
            end += 1
        if offset > first:
            return 0  # a gap the rows do not cover (evicted here since): loading after it would not help
        return max(0, end - first) * self.block_size

    def schedule(self, seq: "Sequence", num_tokens: int) -> None:
        """After admission allocated blocks for `num_tokens` loaded tokens ending at `seq.num_computed_tokens`:
        those blocks get their rows before this step's forward pass. With nothing to load the rows are done with."""
        load = self._waiting.pop(seq.seq_id, None)
        if load is None:
            return
        if num_tokens == 0:
            if load.hashes and load.hashes[0] in seq.block_hashes[seq.num_computed_tokens // self.block_size + 1:]:
                # The rows start after blocks that were cached here when they were pulled, evicted since.
                self._failed(seq, load, "blocks before the received ones are no longer cached here")
            else:
                load.on_done(None)
            return
        end = seq.num_computed_tokens // self.block_size
        first = end - num_tokens // self.block_size
        offset = seq.block_hashes.index(load.hashes[0])
        self._scheduled.append(_Scheduled(seq, load, seq.block_ids[first:end],
                                          list(range(first - offset, end - offset))))

    def finish(self, seq: "Sequence") -> None:
        """The sequence ended (aborted while it waited): its rows are not needed any more."""
        load = self._waiting.pop(seq.seq_id, None)
        if load is not None:
            load.on_done(None)

    # ---- worker side -----------------------------------------------------------------------------------------

    def load(self, write: WriteRows) -> list[tuple["Sequence", int]]:
        """Copies this step's scheduled rows into their blocks; returns (sequence, tokens) for each load that
        cannot be trusted, whose tokens must be computed instead (what it wrote is never made findable)."""
        failed = []
        scheduled, self._scheduled = self._scheduled, []
        for item in scheduled:
            try:
                item.load.source.read(lambda runs, item=item: write(item.block_ids, item.rows, runs))
            except KVLoadError as exc:
                self._failed(item.seq, item.load, str(exc))
                failed.append((item.seq, len(item.block_ids) * self.block_size))
                continue
            item.load.on_done(None)
        return failed

    def _failed(self, seq: "Sequence", load: KVLoad, why: str) -> None:
        self.num_failures += 1
        log.warning("request %s: received KV blocks not used, computing them instead: %s", seq.request_id, why)
        load.on_done(why)
