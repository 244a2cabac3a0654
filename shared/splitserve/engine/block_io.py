"""A KV block's bytes: how blocks leave and enter an engine's paged cache.

One block's payload is `[num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]` in the cache dtype, C order.
Each layer's cache is `[2, num_blocks, block_size, num_kv_heads, head_dim]`, so a block is gathered from every
layer into one contiguous row; rows are handed around as uint8 so any transport can move them as bytes.
"""

from __future__ import annotations

import bisect
import zlib
from typing import Optional

import torch

from splitserve.kv_blocks.layout import KVLayout


def export_blocks(kv_caches: list[torch.Tensor], block_ids: list[int], out_device: str = "cpu",
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 `[len(block_ids), bytes_per_block]` copies of the blocks (into `out`, host rows of that shape, if
    given: a transport passes its faulted-in receive buffers).

    On the host each layer's K and V are gathered straight into their place (gather_blocks_into): one pass over
    the bytes (200 MiB of Llama-3-8B-shaped blocks: 268 ms with a stack of per-layer gathers, 55 ms gathered in
    place through a temporary per layer, ~16 ms with no temporary).
    """
    first = kv_caches[0]
    per_block = row_bytes(kv_caches)
    if not block_ids:
        return torch.empty((0, per_block), dtype=torch.uint8)
    n = len(block_ids)
    if out_device != "cpu":
        index = torch.tensor(block_ids, dtype=torch.long, device=first.device)
        per_layer = [cache.index_select(1, index) for cache in kv_caches]  # each [2, n, bs, H, D]
        blocks = torch.stack(per_layer, dim=0).permute(2, 0, 1, 3, 4, 5).contiguous()  # [n, L, 2, bs, H, D]
        return blocks.view(torch.uint8).reshape(n, -1).to(out_device)
    rows = out if out is not None else torch.empty((n, per_block), dtype=torch.uint8)
    gather_blocks_into(kv_caches, block_ids, rows)
    return rows


def row_bytes(kv_caches: list[torch.Tensor]) -> int:
    """One block's payload in bytes: K and V of every layer."""
    first = kv_caches[0]
    return first[:, 0].numel() * first.element_size() * len(kv_caches)


def gather_blocks_into(kv_caches: list[torch.Tensor], block_ids: list[int], rows: torch.Tensor) -> None:
    """Writes the blocks' payloads into `rows` (uint8 `[len(block_ids), bytes_per_block]`, rows contiguous, on
    the host): e.g. straight into a kv-store's mapped slab. Host caches are gathered by one index_select per
    layer and K/V with the row slice as its output, so no temporary is made; device caches go through one.
    """
    first = kv_caches[0]
    n = len(block_ids)
    if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape[0] != n or not rows[:1].is_contiguous():
        raise ValueError(f"expected uint8 rows [{n}, bytes_per_block] with contiguous rows, got "
                         f"{rows.dtype} {tuple(rows.shape)}")
    if not n:
        return
    segment = first[0, 0].numel()  # one block's K (or V) of one layer, in elements
    out = rows.view(first.dtype).view(n, len(kv_caches), 2, segment)
    index = torch.tensor(block_ids, dtype=torch.long, device=first.device)
    for layer, cache in enumerate(kv_caches):
        for kv in range(2):
            source = cache[kv].view(cache.shape[1], segment)
            if source.device.type == "cpu":
                torch.index_select(source, 0, index, out=out[:, layer, kv])
            else:
                out[:, layer, kv].copy_(source.index_select(0, index))


class CacheBlocks:
    """Blocks of an engine's KV cache lent to a transfer, so a transport can copy them straight from the cache
    tensors into their destination instead of through an exported copy.

    Only full prompt blocks are lent, and the engine holds a reference on each while they are out, so nothing
    writes or reuses them; `release()` (once, from any thread) gives them back. Shaped like the rows they
    stand for: `shape` is `(num_blocks, bytes_per_block)`.
    """

    def __init__(self, kv_caches: list[torch.Tensor], block_ids: list[int], release=None):
        self.kv_caches = kv_caches
        self.block_ids = list(block_ids)
        self.shape = (len(self.block_ids), row_bytes(kv_caches))
        self._release = release

    def rows(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A copy as uint8 rows (into `out` if given), for transports that cannot reach the destination's memory."""
        return export_blocks(self.kv_caches, self.block_ids, out=out)

    def copy_rows_to(self, first: int, count: int, out: torch.Tensor) -> None:
        """Rows first..first+count-1 into `out` (uint8 `[count, bytes_per_block]`)."""
        gather_blocks_into(self.kv_caches, self.block_ids[first:first + count], out)

    def subset(self, indices: list[int]) -> "CacheBlocks":
        """The listed rows, lent under this object's hold (releasing stays with this object)."""
        return CacheBlocks(self.kv_caches, [self.block_ids[i] for i in indices])

    def row_crc32s(self) -> list[int]:
        """CRC-32 of each row as it would be laid out, computed over the cache in place (K then V, layer by
        layer, chained), so checksums describe the source even when the bytes go straight to another process."""
        crcs = []
        for block_id in self.block_ids:
            crc = 0
            for cache in self.kv_caches:
                for kv in range(2):
                    crc = zlib.crc32(cache[kv, block_id].contiguous().cpu().view(torch.uint8).numpy(), crc)
            crcs.append(crc & 0xFFFFFFFF)
        return crcs

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


def import_blocks(kv_caches: list[torch.Tensor], block_ids: list[int], rows: torch.Tensor, layout: KVLayout,
                  row_indices: Optional[list[int]] = None) -> None:
    """Writes payload rows (uint8 `[num_rows, bytes_per_block]`) into the given blocks: block_ids[i] gets row
    row_indices[i] (default: row i, and then there must be exactly one row per block).

    Rows are read in place (e.g. views of a kv-store's slots), so received bytes are copied once, straight
    into the cache: a block at a time for large blocks when the layers share one tensor, else a layer's K or V
    for all blocks at a time (a picked subset of rows is gathered per layer, which stays small).
    """
    if not block_ids:
        return
    expected_rows = len(block_ids) if row_indices is None else rows.shape[0]
    if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape != (expected_rows, layout.bytes_per_block):
        raise ValueError(f"expected uint8 rows of shape ({expected_rows}, {layout.bytes_per_block}), "
                         f"got {rows.dtype} {tuple(rows.shape)}")
    if row_indices is not None and (len(row_indices) != len(block_ids)
                                    or any(not 0 <= r < rows.shape[0] for r in row_indices)):
        raise ValueError(f"row_indices must name one of the {rows.shape[0]} rows for each of {len(block_ids)} blocks")
    device = kv_caches[0].device
    rows_here = rows.to(device).contiguous()
    picked = list(range(len(block_ids))) if row_indices is None else list(row_indices)
    stacked = stacked_caches(kv_caches)
    if stacked is not None and layout.bytes_per_block >= PER_BLOCK_COPY_BYTES:
        blocks = rows_here.view(kv_caches[0].dtype).view(rows.shape[0], layout.num_layers, 2, -1)
        for block_id, row in zip(block_ids, picked):
            stacked[:, :, block_id].copy_(blocks[row])  # every layer's K and V of one block in one strided copy
        return
    segment = layout.block_size * layout.num_kv_heads * layout.head_dim
    blocks = rows_here.view(kv_caches[0].dtype).view(rows.shape[0], layout.num_layers, 2, segment)
    index = torch.tensor(block_ids, dtype=torch.long, device=device)
    pick = None if picked == list(range(len(picked))) else torch.tensor(picked, dtype=torch.long, device=device)
    for layer, cache in enumerate(kv_caches):
        for kv in range(2):
            source = blocks[:len(block_ids), layer, kv] if pick is None else blocks[:, layer, kv].index_select(0, pick)
            cache[kv].view(cache.shape[1], segment).index_copy_(0, index, source)


def import_runs(kv_caches: list[torch.Tensor], block_ids: list[int], rows: list[int],
                runs: list[tuple[int, torch.Tensor]], layout: KVLayout) -> None:
    """block_ids[i] gets row rows[i] of rows that arrived as runs of (first row, uint8 `[k, bytes_per_block]`),
    e.g. several regions of a kv-store's memory: one import_blocks per run, reading each run in place."""
    starts = [first for first, _ in runs]
    per_run: dict[int, tuple[list[int], list[int]]] = {}
    for block_id, row in zip(block_ids, rows):  # each row to the run it lies in (runs are row-ordered)
        run = bisect.bisect_right(starts, row) - 1
        if run < 0 or row - starts[run] >= runs[run][1].shape[0]:
            raise ValueError(f"row {row} is in none of the received runs")
        ids, rows_in_run = per_run.setdefault(run, ([], []))
        ids.append(block_id)
        rows_in_run.append(row - starts[run])
    for run, (ids, rows_in_run) in per_run.items():
        import_blocks(kv_caches, ids, runs[run][1], layout, row_indices=rows_in_run)


# Above this a block's payload is written with one copy per block (all layers at once, when the layers share one
# tensor); below, per-call overhead wins and each layer's K and V take one index_copy_ for all blocks. Measured
# on one thread: 2 MiB blocks (Llama-3-8B) 6.3 against 2.8 GB/s, 128 KiB about even, 32 KiB 3.0 against 4.0 GB/s.
PER_BLOCK_COPY_BYTES = 128 << 10


def stacked_caches(kv_caches: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """`[num_layers, 2, num_blocks, block elements]` over the caches when they are the layers of one tensor
    (ModelRunner allocates them so), else None."""
    first = kv_caches[0]
    if not all(cache.is_contiguous() and cache.shape == first.shape for cache in kv_caches):
        return None
    layer_elements = first.numel()
    base = first.data_ptr()
    step = layer_elements * first.element_size()
    if any(cache.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
           or cache.data_ptr() != base + i * step for i, cache in enumerate(kv_caches)):
        return None
    num_blocks = first.shape[1]
    segment = first[0, 0].numel()
    return torch.as_strided(first, (len(kv_caches), 2, num_blocks, segment),
                            (layer_elements, num_blocks * segment, segment, 1))
