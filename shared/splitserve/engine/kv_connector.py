"""The engine's one port for KV that moves between processes, in the spirit of vLLM's KV connector: the engine
states what it needs and never sees a transport, a store or a pin.

- Scheduler side: `LLMEngine.num_cached_prefix_blocks(hashes)` says how much of a prompt is already here, so a
  worker loads only the rest; `export_kv` on a request says what to save when it finishes (a KVExport).
- Worker side: a request may come with prompt blocks received from elsewhere, as a ReceivedKV. The engine's
  KV cache manager allocates blocks for the rows it lacks and the engine copies them in on its own thread,
  through ReceivedKV.read; whatever keeps the rows readable (a kv-store's pin) belongs to the transport that
  made the ReceivedKV, which ends it. A read that cannot be trusted raises KVLoadError and the engine computes
  those blocks instead. Saved blocks go out as copied rows, or lent in place (`LLMEngine.lend_exports`) until
  the saver releases them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    import torch

# Rows as they arrived: (index of the first row, uint8 view `[k, bytes_per_block]`) per contiguous run.
Runs = list[tuple[int, "torch.Tensor"]]


class KVLoadError(RuntimeError):
    """Received rows could not be copied in a way that can be trusted (their source was given back first, or
    stopped being guaranteed before the copy ended); the engine computes those blocks instead."""


class ReceivedKV(Protocol):
    """The leading `count` rows of a prompt's blocks, received from another process for one request."""

    count: int

    def read(self, write: Callable[[Runs], None]) -> None:
        """Calls `write(runs)` once, while the rows are readable; raises KVLoadError if what was written cannot
        be trusted (the caller must then drop it)."""
        ...


class RowsInMemory:
    """Rows this process owns (a uint8 tensor `[n, bytes_per_block]`): always readable."""

    def __init__(self, rows: "torch.Tensor"):
        self.count = rows.shape[0]
        self._rows = rows

    def read(self, write: Callable[[Runs], None]) -> None:
        write([(0, self._rows)] if self.count else [])
