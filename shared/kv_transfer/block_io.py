"""A KV block's bytes: how blocks leave and enter an engine's paged cache.

One block's payload is `[num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]` in the cache dtype, C order.
Each layer's cache is `[2, num_blocks, block_size, num_kv_heads, head_dim]`, so a block is gathered from every
layer into one contiguous row; rows are handed around as uint8 so any transport can move them as bytes.
"""

from __future__ import annotations

from typing import Optional

import torch

from splitserve.engine.model_runner import KVLayout
from splitserve.kv_transfer.host_buffers import RECEIVE_BUFFERS


def export_blocks(kv_caches: list[torch.Tensor], block_ids: list[int], out_device: str = "cpu") -> torch.Tensor:
    """uint8 `[len(block_ids), bytes_per_block]` copies of the blocks.

    On the host the rows come from the process's pool of faulted-in buffers and each layer is copied straight
    into its place: one pass over the bytes instead of three, into memory that takes no page faults (measured
    for 200 MiB of Llama-3-8B-shaped blocks: 55 ms against 268 ms with a stack of per-layer gathers).
    """
    first = kv_caches[0]
    per_block = first[:, 0].numel() * first.element_size() * len(kv_caches)
    if not block_ids:
        return torch.empty((0, per_block), dtype=torch.uint8)
    n = len(block_ids)
    index = torch.tensor(block_ids, dtype=torch.long, device=first.device)
    if out_device != "cpu":
        per_layer = [cache.index_select(1, index) for cache in kv_caches]  # each [2, n, bs, H, D]
        blocks = torch.stack(per_layer, dim=0).permute(2, 0, 1, 3, 4, 5).contiguous()  # [n, L, 2, bs, H, D]
        return blocks.view(torch.uint8).reshape(n, -1).to(out_device)
    rows = RECEIVE_BUFFERS.rows(n, per_block)
    out = rows.view(first.dtype).view(n, len(kv_caches), *first[:, 0].shape)  # [n, L, 2, bs, H, D]
    for layer, cache in enumerate(kv_caches):
        out[:, layer].copy_(cache.index_select(1, index).transpose(0, 1))  # a layer's gather is small; one pass
    return rows


def import_blocks(kv_caches: list[torch.Tensor], block_ids: list[int], rows: torch.Tensor, layout: KVLayout,
                  row_indices: Optional[list[int]] = None) -> None:
    """Writes payload rows (uint8 `[num_rows, bytes_per_block]`) into the given blocks: block_ids[i] gets row
    row_indices[i] (default: row i, and then there must be exactly one row per block).

    Rows are read in place, a layer at a time (a subset is gathered per layer, which stays small), so received
    bytes are copied once into the cache rather than first into a tensor of the picked rows.
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
    blocks = rows.to(device).contiguous().view(layout.dtype).reshape(
        rows.shape[0], layout.num_layers, 2, layout.block_size, layout.num_kv_heads, layout.head_dim)
    index = torch.tensor(block_ids, dtype=torch.long, device=device)
    leading = row_indices is None or row_indices == list(range(len(row_indices)))
    pick = None if leading else torch.tensor(row_indices, dtype=torch.long, device=device)
    for layer, cache in enumerate(kv_caches):
        source = blocks[:len(block_ids), layer] if pick is None else blocks[:, layer].index_select(0, pick)
        cache.index_copy_(1, index, source.transpose(0, 1))
